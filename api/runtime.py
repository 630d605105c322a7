"""What the API holds while it runs: config, cached status, background tasks, rate limits."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from chatmaild.accountstats import AccountStats, read_stats, scan_mailboxes
from chatmaild.blocklist import Blocklist
from chatmaild.config import Config

from .accountcreation import AccountCreationControl, CreationState
from .adminctl import IndexCache
from .checks import Checker, CheckResult, CheckStateStore, Facts, overall
from .dnscheck import check_dns
from .models import Check, DnsReport, ProbeResult, Status
from .probe import run_probe
from .settings import Settings

log = logging.getLogger(__name__)

#: How often the first scheduled probe asks whether the services it needs are active.
SERVICES_POLL_S = 2.0


@dataclass
class StatusSnapshot:
    status: Status
    results: list[CheckResult]
    facts: Facts
    taken: float  # monotonic


def rate_limit_key(client: str) -> str:
    """The unit a client is counted in: an IPv4 address, or an IPv6 /64 (one host's prefix)."""
    try:
        address = ipaddress.ip_address(client)
    except ValueError:
        return client
    if address.version == 4:
        return client
    if address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(ipaddress.ip_network(f"{address}/64", strict=False))


class RateLimiter:
    """Token bucket per client (see rate_limit_key); memory is bounded by forgetting full buckets."""

    MAX_CLIENTS = 10000

    def __init__(self, rate_per_s: float, burst: int):
        self.rate = rate_per_s
        self.burst = burst
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, client: str, now: float | None = None) -> float:
        """0 if the request may pass, else seconds until it would."""
        now = time.monotonic() if now is None else now
        client = rate_limit_key(client)
        tokens, last = self.buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self.buckets[client] = (tokens, now)
            return (1 - tokens) / self.rate
        self.buckets[client] = (tokens - 1, now)
        if len(self.buckets) > self.MAX_CLIENTS:
            self._forget_full(now)
        return 0.0

    def _forget_full(self, now: float) -> None:
        refill = self.burst / self.rate
        self.buckets = {c: v for c, v in self.buckets.items() if now - v[1] < refill}


class Runtime:
    def __init__(self, settings: Settings, config: Config):
        self.settings = settings
        self.config = config
        settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self.creation = AccountCreationControl(config, settings.audit_log_path)
        self.checker = Checker(settings, config, self.creation, self.creation_state)
        self.check_states = CheckStateStore(settings.check_state_path)
        self.account_index = IndexCache(settings.account_index_file)
        self.blocklist = Blocklist(config.blocklist_file)
        self.rate_limiter = RateLimiter(settings.new_account.rate_per_s, settings.new_account.burst)
        self.last_status: StatusSnapshot | None = None
        self.account_stats: AccountStats | None = None
        self._account_stats_version: tuple[int, int, int] | None = None
        self._status_lock = asyncio.Lock()
        self._status_refresh: asyncio.Task | None = None
        self._status_generation = 0
        self._creation_lock = asyncio.Lock()
        self._probe_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []

    # -- status ----------------------------------------------------------------------

    async def status(self) -> StatusSnapshot:
        """The cached status; a stale one is served while a refresh runs in the background
        (so no request waits for the checks), a missing one is computed now."""
        snapshot = self.last_status
        if snapshot is None:
            async with self._status_lock:
                return self.last_status or await self._refresh_status()
        stale = time.monotonic() - snapshot.taken >= self.settings.status_cache_s
        if stale and (self._status_refresh is None or self._status_refresh.done()):
            self._status_refresh = asyncio.create_task(self._refresh_in_background())
        return snapshot

    async def _refresh_in_background(self) -> None:
        async with self._status_lock:
            try:
                await self._refresh_status()
            except Exception:
                log.exception("status refresh failed")

    async def _refresh_status(self) -> StatusSnapshot:
        generation = self._status_generation
        results, facts = await self.checker.run()
        now = time.time()
        since = self.check_states.update(results, now)
        status = Status(
            status=overall(results),
            mail_domain=self.config.mail_domain,
            checked_at=datetime.fromtimestamp(now, UTC),
            checks=[
                Check(
                    id=r.id,
                    severity=r.severity,
                    state=r.state,
                    summary=r.summary,
                    hint=r.hint,
                    since=datetime.fromtimestamp(since[r.id], UTC),
                )
                for r in results
            ],
        )
        snapshot = StatusSnapshot(status, results, facts, time.monotonic())
        if generation == self._status_generation:  # else a change made this run outdated
            self.last_status = snapshot
        return snapshot

    async def creation_state(self) -> CreationState:
        """Account creation now, re-opening first if a closing ``until`` has passed."""
        async with self._creation_lock:
            return await asyncio.to_thread(self.creation.current)

    def invalidate_status(self) -> None:
        """Something changed (creation toggled, probe or DNS ran): the next read recomputes."""
        self._status_generation += 1
        self.last_status = None

    @property
    def creation_lock(self) -> asyncio.Lock:
        return self._creation_lock

    # -- background work ---------------------------------------------------------------

    async def scan_accounts(self) -> AccountStats | None:
        if self.settings.account_stats_file is not None:
            await self.read_account_stats()
            return self.account_stats
        self.account_stats = await asyncio.to_thread(scan_mailboxes, self.config.mailboxes_path)
        self.checker.account_stats = self.account_stats
        log.info(
            "counted %d accounts in %.2f s",
            self.account_stats.accounts["all"],
            self.account_stats.duration_s,
        )
        return self.account_stats

    async def read_account_stats(self) -> None:
        """Re-read the file chatmail-accountstats writes, only when it was replaced (a stat
        per call), so /metrics serves a new scan as soon as it is written."""
        path = self.settings.account_stats_file
        try:
            st = path.stat()
            version = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            version = None
        if version == self._account_stats_version:
            return
        self._account_stats_version = version
        self.account_stats = await asyncio.to_thread(read_stats, path)
        self.checker.account_stats = self.account_stats

    async def run_probe(self, publish: bool = True) -> ProbeResult:
        """Probe now; ``publish=False`` keeps the result out of /status and /metrics."""
        async with self._probe_lock:
            result = await run_probe(self.settings, self.config)
        if publish:
            self.checker.probe_result = result
            self.invalidate_status()
        return result

    async def services_active(self) -> bool:
        """Whether every service the checks watch (the probe's path) is active."""
        results = await self.checker.check_services()
        return all(r.state == "ok" for r in results)

    async def _wait_for_services(self, limit: float) -> None:
        deadline = time.monotonic() + limit
        while not await self.services_active():
            if time.monotonic() >= deadline:
                log.warning("probing although not every service is active after %.0f s", limit)
                return
            await asyncio.sleep(SERVICES_POLL_S)

    async def _probe_schedule(self) -> None:
        """The scheduled probe: after the services are up, every ``interval_s``; a failure
        is retried after ``retry_s``, doubling up to the interval, and is published only
        when the retry fails too, so one hiccup (a daemon still starting during an apply)
        never turns /health down."""
        probe = self.settings.probe
        await self._wait_for_services(probe.interval_s)
        retry = probe.retry_s
        failed_before = False
        while True:
            try:
                result = await self.run_probe(publish=False)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background probe failed")
                result = None
            if result is not None and (result.ok or failed_before):
                self.checker.probe_result = result
                self.invalidate_status()
            if result is not None and result.ok:
                failed_before, retry = False, probe.retry_s
                await asyncio.sleep(probe.interval_s)
                continue
            if result is not None:
                log.warning("probe failed, retrying in %.0f s: %s", retry, result.detail)
            failed_before = True
            await asyncio.sleep(retry)
            retry = min(retry * 2, probe.interval_s)

    async def check_dns(self) -> DnsReport:
        report = await check_dns(self.settings, self.config)
        self.checker.dns_report = report
        self.invalidate_status()
        return report

    def start(self) -> None:
        s = self.settings
        if s.account_scan_interval_s > 0:
            self._every(s.account_scan_interval_s, self.scan_accounts, "account scan")
        self._every(s.reopen_interval_s, self._reopen, "account creation re-open")
        if s.probe.enabled and s.probe.interval_s > 0:
            self._tasks.append(asyncio.create_task(self._probe_schedule(), name="probe"))
        if s.dns.check_interval_s > 0:
            self._every(s.dns.check_interval_s, self.check_dns, "dns check", delay=10.0)

    async def stop(self) -> None:
        if self._status_refresh is not None:
            self._tasks.append(self._status_refresh)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    async def _reopen(self) -> None:
        before = await asyncio.to_thread(self.creation.read)
        after = await self.creation_state()
        if before.closed != after.closed:
            self.invalidate_status()

    def _every(self, interval: float, job, name: str, delay: float = 0.0) -> None:
        async def loop():
            await asyncio.sleep(delay)
            while True:
                try:
                    await job()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("background %s failed", name)
                await asyncio.sleep(interval)

        self._tasks.append(asyncio.create_task(loop(), name=name))
