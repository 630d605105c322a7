"""Failed SMTP logins per client address, for throttling password guessing.

OpenSMTPD has no counterpart of Postfix's anvil or Dovecot's auth penalty: the smtpd
filter (:mod:`chatmaild.smtpdfilter`) records every failed AUTH it is told about and
refuses the next AUTH of an address that failed ``max_failures`` times within ``window``
seconds. Successful logins are never counted, so a first login (which creates the
account) is never slowed. Memory is bounded: at most ``max_clients`` addresses are
tracked, those that failed least recently are forgotten first.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable

#: Addresses tracked at most (each a few hundred bytes).
MAX_CLIENTS = 10_000


def client_key(source: str) -> str:
    """The throttled unit for a client address as smtpd writes it, with a port
    (``link-connect`` report: ``192.0.2.1:40000``, ``IPv6:2001:db8::1:40000``) or
    without (``connect`` filter phase).

    IPv4 addresses count one by one; IPv6 ones by their /64, which one host usually has
    whole. Anything else (``local``) is kept as it is.
    """
    address = source[5:] if source[:5].lower() == "ipv6:" else source
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        without_port, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            return address
        try:
            ip = ipaddress.ip_address(without_port)
        except ValueError:
            return without_port
    if ip.version == 6:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class FailedLogins:
    """Recent failed logins per client address, in a sliding window."""

    def __init__(
        self,
        max_failures: int,
        window: float,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_failures = max_failures
        self.window = window
        self.max_clients = max_clients
        self.clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def failed(self, client: str) -> None:
        times = self._failures.pop(client, None)
        if times is None:
            times = deque(maxlen=self.max_failures)
        times.append(self.clock())
        self._failures[client] = times  # most recent failure last
        while len(self._failures) > self.max_clients:
            self._failures.popitem(last=False)

    def blocked(self, client: str) -> bool:
        """Whether ``client`` failed ``max_failures`` times within the last ``window``."""
        times = self._failures.get(client)
        if times is None:
            return False
        if self.clock() - times[-1] >= self.window:
            del self._failures[client]  # all of them are old
            return False
        return len(times) == self.max_failures and self.clock() - times[0] < self.window
