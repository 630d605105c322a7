"""Per-key rate limiting with GCRA (generic cell rate algorithm), in bounded memory.

Each key has one number, its theoretical arrival time (TAT). A request at ``now`` is
allowed if, after adding one emission interval, the TAT is at most ``burst`` intervals
ahead of ``now``. With 60/minute and a burst of 10: 10 requests pass at once, then one
per second.

A key whose TAT lies in the past has a full bucket and behaves exactly like an unknown
key, so it is dropped. Keys are kept in update order and expired ones are dropped from the
front as requests come in, so the table holds roughly the keys active during the last
``burst`` intervals. ``max_keys`` caps it against floods of distinct keys: the least
recently updated key is dropped (forgetting a limit is safer than refusing everybody).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger(__name__)

DEFAULT_MAX_KEYS = 100_000


class RateLimiter:
    def __init__(
        self,
        per_minute: int,
        burst: int,
        max_keys: int = DEFAULT_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ):
        if per_minute <= 0 or burst <= 0 or max_keys <= 0:
            raise ValueError("per_minute, burst and max_keys must be positive")
        self.interval = 60.0 / per_minute
        self.tolerance = burst * self.interval
        self.max_keys = max_keys
        self._clock = clock
        self._tat: OrderedDict[str, float] = OrderedDict()
        self._capped = False

    def __len__(self) -> int:
        return len(self._tat)

    def acquire(self, key: str) -> float | None:
        """Take one unit for ``key``: None if allowed, else seconds until it would be."""
        now = self._clock()
        self._expire(now)
        tat = max(self._tat.get(key, now), now) + self.interval
        if tat - now > self.tolerance:
            return tat - now - self.tolerance
        self._tat[key] = tat
        self._tat.move_to_end(key)
        if len(self._tat) > self.max_keys:
            self._tat.popitem(last=False)
            if not self._capped:
                log.warning("rate limiter holds %d keys; forgetting the oldest", self.max_keys)
                self._capped = True
        return None

    def _expire(self, now: float) -> None:
        # The front holds the least recently updated keys; a key updated more than
        # ``tolerance`` ago has surely refilled. Stop at the first one still limited.
        tats = self._tat
        while tats:
            key, tat = next(iter(tats.items()))
            if tat > now:
                return
            del tats[key]
