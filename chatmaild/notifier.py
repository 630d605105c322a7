"""Push notifications for new messages, persisted so a restart loses none.

Every (address, device token) pair of an arriving message becomes one queue file
``<mailboxes>/pending_notifications/<uuid>`` holding ``addr\\nstart_ts\\ntoken`` (upstream's
format, so a migrated relay re-sends upstream's pending items). Worker threads POST the raw
token, which is opaque and encrypted to the notification service, to the push endpoint:

- 200: sent, the file is deleted;
- 410: the device is gone, the token is removed from the address and the file deleted;
- anything else or no answer: retried after 8, 64, 512, 4096 s, until the next retry would
  start more than 5 h after the message arrived ("notification exceeded deadline").

Counters: ``notifications_sent_total`` counts 200 answers, ``notifications_failed_total``
counts failed attempts (a notification retried three times counts three), so a failing
endpoint shows up within seconds instead of after the 5 h deadline.
"""

from __future__ import annotations

import heapq
import http.client
import itertools
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .counters import Counters
from .fileio import write_bytes_atomic
from .user import check_address

log = logging.getLogger(__name__)

QUEUE_DIRNAME = "pending_notifications"
DEADLINE_S = 5 * 3600
RETRY_BASE_DELAY_S = 8.0
RETRY_FACTOR = 8
REQUEST_TIMEOUT_S = 60.0
WORKERS = 8


class TokenStore(Protocol):
    """What the notifier needs from the metadata store."""

    def get_tokens_for_addr(self, addr: str) -> list[str]: ...

    def remove_token_from_addr(self, addr: str, token: str) -> None: ...


@dataclass(frozen=True)
class QueueEntry:
    addr: str
    start_ts: float
    token: str


def serialize_entry(entry: QueueEntry) -> bytes:
    return f"{entry.addr}\n{entry.start_ts}\n{entry.token}".encode()


def parse_entry(data: bytes) -> QueueEntry:
    """Parse a queue file's content; ValueError for anything not written by us."""
    lines = data.decode("utf-8").split("\n")
    if len(lines) != 3:
        raise ValueError(f"expected 3 lines, got {len(lines)}")
    addr, start_ts, token = lines
    if not token or any(c.isspace() for c in token):
        raise ValueError("missing or malformed token")
    # The address becomes a path when a 410 removes its token.
    return QueueEntry(addr=check_address(addr), start_ts=float(start_ts), token=token)


def retry_delay(attempt: int, base_delay: float = RETRY_BASE_DELAY_S) -> float:
    """Delay before retry number ``attempt`` (1, 2, ...): 8, 64, 512, 4096 s by default."""
    return base_delay * RETRY_FACTOR ** (attempt - 1)


def post_token(url: str, token: str, timeout: float) -> int:
    """POST the token; the HTTP status, or OSError/HTTPException when there is none."""
    request = urllib.request.Request(
        url,
        data=token.encode("utf-8"),
        method="POST",
        headers={"Content-Type": "application/octet-stream"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        return exc.code


@dataclass
class PendingNotification:
    entry: QueueEntry
    path: Path
    failed_attempts: int = 0

    @property
    def name(self) -> str:
        # The file name identifies an item in logs without revealing address or token.
        return self.path.name


class Notifier:
    def __init__(
        self,
        queue_dir: Path,
        tokens: TokenStore,
        push_url: str,
        counters: Counters,
        *,
        retry_base_delay: float = RETRY_BASE_DELAY_S,
        deadline: float = DEADLINE_S,
        request_timeout: float = REQUEST_TIMEOUT_S,
        workers: int = WORKERS,
    ):
        self.queue_dir = Path(queue_dir)
        self.tokens = tokens
        self.push_url = push_url
        self.counters = counters
        self.retry_base_delay = retry_base_delay
        self.deadline = deadline
        self.request_timeout = request_timeout
        self.num_workers = workers
        self._ready: queue.Queue[PendingNotification | None] = queue.Queue()
        # Retries wait in a heap of (due time, sequence, item) until the scheduler moves
        # them to the ready queue, so no worker sleeps on a retry.
        self._delayed: list[tuple[float, int, PendingNotification]] = []
        self._sequence = itertools.count()
        self._wakeup = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- producing ------------------------------------------------------------------

    def new_message_for_addr(self, addr: str) -> None:
        """Queue one notification per device token of ``addr``."""
        now = time.time()
        for token in self.tokens.get_tokens_for_addr(addr):
            entry = QueueEntry(addr=addr, start_ts=now, token=token)
            path = self.queue_dir / uuid.uuid4().hex
            write_bytes_atomic(path, serialize_entry(entry))
            self._ready.put(PendingNotification(entry, path))

    def requeue_persistent_items(self) -> int:
        """Queue the items a previous run left behind; returns how many."""
        count = 0
        for path in sorted(self.queue_dir.iterdir()):
            if path.name.endswith(".tmp") or not path.is_file() or path.is_symlink():
                log.warning("removing spurious queue item %s", path.name)
                _remove(path)
                continue
            try:
                entry = parse_entry(path.read_bytes())
            except (OSError, ValueError) as exc:
                log.warning("removing spurious queue item %s: %s", path.name, exc)
                _remove(path)
                continue
            self._ready.put(PendingNotification(entry, path))
            count += 1
        if count:
            log.info("re-queued %d pending notification(s)", count)
        return count

    # -- threads --------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._threads = [threading.Thread(target=self._schedule, name="notifier-scheduler")]
        self._threads += [
            threading.Thread(target=self._work, name=f"notifier-{i}")
            for i in range(self.num_workers)
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the threads; queued items stay on disk for the next start."""
        self._stopping.set()
        with self._wakeup:
            self._wakeup.notify_all()
        for _ in range(self.num_workers):
            self._ready.put(None)
        for thread in self._threads:
            thread.join(timeout)
        self._threads = []

    def _schedule(self) -> None:
        with self._wakeup:
            while not self._stopping.is_set():
                now = time.time()
                while self._delayed and self._delayed[0][0] <= now:
                    self._ready.put(heapq.heappop(self._delayed)[2])
                timeout = self._delayed[0][0] - now if self._delayed else None
                self._wakeup.wait(timeout)

    def _work(self) -> None:
        while True:
            item = self._ready.get()
            if item is None or self._stopping.is_set():
                return
            try:
                self.attempt(item)
            except Exception:  # a worker must survive any one item
                log.exception("notification %s: unexpected error, dropped", item.name)
                _remove(item.path)

    # -- one attempt ----------------------------------------------------------------

    def attempt(self, item: PendingNotification) -> None:
        """Send one notification and settle it: done, token removed, or retry later."""
        if time.time() > item.entry.start_ts + self.deadline:
            self._drop(item)
            return
        try:
            status = post_token(self.push_url, item.entry.token, self.request_timeout)
        except (OSError, http.client.HTTPException) as exc:
            status, reason = None, f"{type(exc).__name__}: {exc}"
        else:
            reason = f"HTTP {status}"
        if status == 200:
            self.counters.inc("notifications_sent_total")
            _remove(item.path)
        elif status == 410:
            log.info("notification %s: device token expired, removing it", item.name)
            self.tokens.remove_token_from_addr(item.entry.addr, item.entry.token)
            _remove(item.path)
        else:
            self.counters.inc("notifications_failed_total")
            log.warning("Notification request failed (%s): %s", item.name, reason)
            self._retry_later(item)

    def _retry_later(self, item: PendingNotification) -> None:
        item.failed_attempts += 1
        due = time.time() + retry_delay(item.failed_attempts, self.retry_base_delay)
        if due > item.entry.start_ts + self.deadline:
            self._drop(item)
            return
        with self._wakeup:
            heapq.heappush(self._delayed, (due, next(self._sequence), item))
            self._wakeup.notify()

    def _drop(self, item: PendingNotification) -> None:
        log.error("notification exceeded deadline, dropping %s", item.name)
        _remove(item.path)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.error("cannot remove queue item %s: %s", path.name, exc)
