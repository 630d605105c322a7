"""The health checks behind /status, /health and ``chatmail_check_ok``.

Parsing (systemctl/rcctl output, ``postqueue -j``, certificates) is pure; the checks
are small coroutines run concurrently, each under a timeout, so one hung command turns
its own checks ``unknown`` instead of stalling the response.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

from chatmaild.accountstats import AccountStats
from chatmaild.config import Config
from chatmaild.fileio import write_text_atomic

from .accountcreation import AccountCreationControl, CreationState, statvfs_path
from .models import DnsReport, ProbeResult
from .probe import unprovable
from .settings import PortSpec, Settings

log = logging.getLogger(__name__)

POSTFIX_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")
#: The version mark of our Dovecot build (scripts/lib/dovecotbuild.py VERSION_SUFFIX).
PATCHED_DOVECOT_MARK = "+chatmail"

# STUN (RFC 8489): a Binding request is a bare 20-byte header; coturn answers it without
# credentials, so it shows the TURN server serves without handing out a login.
STUN_BINDING_REQUEST = 0x0001
STUN_BINDING_SUCCESS = 0x0101
STUN_MAGIC_COOKIE = 0x2112A442
STUN_ATTEMPTS = 3
# loopback answers in well under a millisecond; all attempts fit the check's 3 s timeout
STUN_ATTEMPT_TIMEOUT_S = 0.5


@dataclass
class CheckResult:
    id: str
    severity: str  # critical | warning | info
    state: str  # ok | fail | unknown
    summary: str
    hint: str = ""


@dataclass
class Facts:
    """Numbers the checks found that /metrics exports as gauges."""

    tls_not_after: float | None = None
    queue_depth: dict[str, int] = field(default_factory=dict)
    registration_open: bool | None = None
    version: str | None = None


# -- pure parsing ----------------------------------------------------------------------


def parse_systemctl_is_active(names: list[str], stdout: str) -> dict[str, str]:
    """``systemctl is-active a b`` prints one state per unit, in order."""
    lines = stdout.split()
    if len(lines) != len(names):
        raise ValueError(f"expected {len(names)} states from systemctl, got {len(lines)}")
    return dict(zip(names, lines, strict=True))


def parse_postqueue_json(stdout: str) -> dict[str, int]:
    """Messages per queue from ``postqueue -j`` (one JSON object per message)."""
    depth = dict.fromkeys(POSTFIX_QUEUES, 0)
    for line in stdout.splitlines():
        if not line.strip():
            continue
        message = json.loads(line)
        queue = str(message.get("queue_name", "unknown"))
        depth[queue] = depth.get(queue, 0) + 1
    return depth


def parse_smtpctl_queue(stdout: str) -> dict[str, int]:
    """OpenSMTPD's ``smtpctl show queue`` prints one envelope per line, no queue names."""
    return {"queue": sum(1 for line in stdout.splitlines() if line.strip())}


def stun_binding_request(transaction_id: bytes) -> bytes:
    return struct.pack("!HHI12s", STUN_BINDING_REQUEST, 0, STUN_MAGIC_COOKIE, transaction_id)


def is_stun_binding_success(data: bytes, transaction_id: bytes) -> bool:
    """A Binding success response to our request (same transaction ID)."""
    if len(data) < 20:
        return False
    kind, _, cookie = struct.unpack("!HHI", data[:8])
    return (
        kind == STUN_BINDING_SUCCESS
        and cookie == STUN_MAGIC_COOKIE
        and data[8:20] == transaction_id
    )


def cert_not_after(pem: bytes) -> float:
    """Expiry (epoch seconds) of the first certificate in a PEM file."""
    from cryptography import x509

    return x509.load_pem_x509_certificate(pem).not_valid_after_utc.timestamp()


def default_ports(config: Config, mta: str) -> list[PortSpec]:
    ports = [
        PortSpec(port=25, what=f"SMTP ({'Postfix' if mta == 'postfix' else 'OpenSMTPD'})"),
        PortSpec(port=587, what="submission"),
        PortSpec(port=465, what="submissions"),
        PortSpec(port=993, what="IMAPS (Dovecot)"),
        PortSpec(port=143, what="IMAP (Dovecot)", severity="warning"),
        PortSpec(port=443, what="HTTPS/ALPN (nginx)"),
    ]
    if mta == "postfix":
        # OpenSMTPD runs the same rules as its filter process: no ports of their own
        ports += [
            PortSpec(port=config.filtermail_smtp_port, what="filtermail outgoing"),
            PortSpec(port=config.filtermail_smtp_port_incoming, what="filtermail incoming"),
        ]
    return ports


# -- running commands ------------------------------------------------------------------


async def run_command(argv: list[str], timeout: float) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else ""


# -- the checks ------------------------------------------------------------------------


class Checker:
    """Runs every check once; owns the small caches that keep a run cheap."""

    def __init__(
        self,
        settings: Settings,
        config: Config,
        creation: AccountCreationControl,
        creation_state: Callable[[], Awaitable[CreationState]],
    ):
        self.settings = settings
        self.config = config
        self.creation = creation
        #: The state under the API's creation lock (reading may re-open an expired close).
        self.creation_state = creation_state
        self.cert_path = settings.tls_cert
        self.ports = settings.ports or default_ports(config, settings.mta)
        self._cert_cache: tuple[tuple[int, int], float] | None = None
        #: Set by the probe, the DNS task and the account scan; read by every run.
        self.probe_result: ProbeResult | None = None
        self.dns_report: DnsReport | None = None
        self.account_stats: AccountStats | None = None

    async def run(self) -> tuple[list[CheckResult], Facts]:
        facts = Facts()
        timeout = self.settings.check_timeout_s
        groups: list[tuple[list[str], str, Callable[[], Awaitable[list[CheckResult]]]]] = [
            (
                [f"service.{s.name}" for s in self.settings.services],
                "critical",
                self.check_services,
            ),
            *(([f"port.{p.port}"], p.severity, partial(self.check_port, p)) for p in self.ports),
            (["tls.expiry"], "critical", partial(self.check_tls, facts)),
            (["queue.depth"], "warning", partial(self.check_queue, facts)),
            (["disk.mailboxes"], "critical", self.check_disk),
            (["registration.open"], "warning", partial(self.check_registration, facts)),
            (["version"], "info", partial(self.check_version, facts)),
            (["accounts.password_files"], "warning", self.check_password_files),
        ]
        if self.settings.turn_port:
            groups.append((["turn.stun"], "warning", self.check_turn))
        if self.settings.dovecot is not None:
            groups.append((["dovecot.build"], "warning", self.check_dovecot_build))
        runs = [_guarded(ids, severity, fn, timeout) for ids, severity, fn in groups]
        results = [r for group in await asyncio.gather(*runs) for r in group]
        results.append(self.check_probe())
        results.extend(self.check_dns())
        return results, facts

    async def check_services(self) -> list[CheckResult]:
        specs = self.settings.services
        if not specs:
            return []
        timeout = self.settings.check_timeout_s
        if self.settings.service_manager == "systemd":
            names = [s.name for s in specs]
            _, stdout, stderr = await run_command(["systemctl", "is-active", "--", *names], timeout)
            try:
                states = parse_systemctl_is_active(names, stdout)
            except ValueError:
                reason = _first_line(stderr) or _first_line(stdout) or "no output"
                return [
                    CheckResult(
                        f"service.{s.name}",
                        s.severity,
                        "unknown",
                        f"systemctl failed: {reason}",
                        "check that systemd runs and the API may call systemctl",
                    )
                    for s in specs
                ]
        else:
            codes = await asyncio.gather(
                *(run_command(["rcctl", "check", s.name], timeout) for s in specs)
            )
            states = {
                s.name: "active" if rc == 0 else "inactive"
                for s, (rc, _, _) in zip(specs, codes, strict=True)
            }
        results = []
        for spec in specs:
            state = states[spec.name]
            ok = state == "active"
            results.append(
                CheckResult(
                    f"service.{spec.name}",
                    spec.severity,
                    "ok" if ok else "fail",
                    state,
                    "" if ok else f"journalctl -u {spec.name} -n 50; systemctl restart {spec.name}",
                )
            )
        return results

    async def check_port(self, spec: PortSpec) -> list[CheckResult]:
        cid = f"port.{spec.port}"
        what = f"{spec.what} " if spec.what else ""
        try:
            _, writer = await asyncio.open_connection(spec.host, spec.port)
        except OSError as exc:
            return [
                CheckResult(
                    cid,
                    spec.severity,
                    "fail",
                    f"{what}{spec.host}:{spec.port} not accepting: {exc.strerror or exc}",
                    f"check the service that should listen on {spec.port}",
                )
            ]
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return [CheckResult(cid, spec.severity, "ok", f"{what}{spec.host}:{spec.port} listening")]

    async def check_turn(self) -> list[CheckResult]:
        """coturn answers a STUN Binding request on its port (UDP, loopback); calls are
        not mail, so a silent TURN server is a warning."""
        where = f"127.0.0.1:{self.settings.turn_port}/udp"
        transaction_id = os.urandom(12)
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[bytes | OSError] = asyncio.Queue(maxsize=16)

        class Probe(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr) -> None:
                if not answers.full():
                    answers.put_nowait(data)

            def error_received(self, exc: OSError) -> None:  # ICMP: nothing listens
                if not answers.full():
                    answers.put_nowait(exc)

        transport, _ = await loop.create_datagram_endpoint(
            Probe, remote_addr=("127.0.0.1", self.settings.turn_port)
        )
        problem = f"no STUN answer from {where}"
        try:
            for _ in range(STUN_ATTEMPTS):  # UDP: a lost datagram is sent again
                transport.sendto(stun_binding_request(transaction_id))
                deadline = loop.time() + STUN_ATTEMPT_TIMEOUT_S
                while (left := deadline - loop.time()) > 0:
                    try:
                        answer = await asyncio.wait_for(answers.get(), left)
                    except TimeoutError:
                        break
                    if isinstance(answer, OSError):
                        return self.turn_failed(f"{where}: {answer.strerror or answer}")
                    if is_stun_binding_success(answer, transaction_id):
                        return [
                            CheckResult("turn.stun", "warning", "ok", f"coturn answers on {where}")
                        ]
                    problem = f"{where} answered something that is not a STUN Binding success"
        finally:
            transport.close()
        return self.turn_failed(problem)

    @staticmethod
    def turn_failed(problem: str) -> list[CheckResult]:
        return [
            CheckResult(
                "turn.stun",
                "warning",
                "fail",
                problem,
                "calls get no relay: journalctl -u coturn -n 50; systemctl restart coturn",
            )
        ]

    async def check_tls(self, facts: Facts) -> list[CheckResult]:
        path = self.cert_path
        try:
            stat = path.stat()
            key = (stat.st_mtime_ns, stat.st_size)
            if self._cert_cache is None or self._cert_cache[0] != key:
                self._cert_cache = (key, cert_not_after(path.read_bytes()))
            not_after = self._cert_cache[1]
        except (OSError, ValueError) as exc:
            return [
                CheckResult(
                    "tls.expiry",
                    "critical",
                    "fail",
                    f"cannot read certificate {path}: {exc}",
                    "re-run the salt state chatmail.tls",
                )
            ]
        facts.tls_not_after = not_after
        days = (not_after - datetime.now(UTC).timestamp()) / 86400
        summary = f"{path} valid for {days:.1f} more days"
        if days < self.settings.tls_fail_days:
            return [
                CheckResult(
                    "tls.expiry",
                    "critical",
                    "fail",
                    summary,
                    "renew now: acmetool --batch reconcile (acme) or replace the external cert",
                )
            ]
        if days < self.settings.tls_warn_days:
            return [
                CheckResult(
                    "tls.expiry",
                    "warning",
                    "fail",
                    summary,
                    "renewal is overdue: check acmetool-reconcile.timer",
                )
            ]
        return [CheckResult("tls.expiry", "critical", "ok", summary)]

    async def check_queue(self, facts: Facts) -> list[CheckResult]:
        if self.settings.queue_snapshot is not None:
            return self.check_queue_snapshot(facts, self.settings.queue_snapshot)
        argv = self.settings.queue_command
        try:
            rc, stdout, stderr = await run_command(argv, self.settings.check_timeout_s)
        except OSError as exc:
            return [
                CheckResult("queue.depth", "warning", "unknown", f"cannot run {argv[0]}: {exc}")
            ]
        if rc != 0:
            return [
                CheckResult(
                    "queue.depth",
                    "warning",
                    "unknown",
                    f"{' '.join(argv)} exited {rc}: {_first_line(stderr)}",
                    "is the MTA running?",
                )
            ]
        try:
            depth = (
                parse_postqueue_json(stdout)
                if argv[0].endswith("postqueue")
                else parse_smtpctl_queue(stdout)
            )
        except (ValueError, AttributeError) as exc:
            return [CheckResult("queue.depth", "warning", "unknown", f"unparsable queue: {exc}")]
        return self.queue_depth_results(facts, depth)

    def check_queue_snapshot(self, facts: Facts, path: Path) -> list[CheckResult]:
        try:
            age = datetime.now(UTC).timestamp() - path.stat().st_mtime
            listing = path.read_text(errors="replace")
        except OSError as exc:
            problem = exc.strerror or str(exc)
        else:
            if age <= self.settings.queue_snapshot_max_age_s:
                return self.queue_depth_results(facts, parse_smtpctl_queue(listing))
            problem = f"{age:.0f} s old"
        return [
            CheckResult(
                "queue.depth",
                "warning",
                "unknown",
                f"queue snapshot {path}: {problem}",
                "chatmail-smtpd-queue (timer or cron, as root) writes it every minute",
            )
        ]

    def queue_depth_results(self, facts: Facts, depth: dict[str, int]) -> list[CheckResult]:
        facts.queue_depth = depth
        total = sum(depth.values())
        summary = f"{total} queued (" + ", ".join(f"{q} {n}" for q, n in depth.items()) + ")"
        if total >= self.settings.queue_fail:
            return [CheckResult("queue.depth", "critical", "fail", summary, "mailq")]
        if total >= self.settings.queue_warn:
            return [CheckResult("queue.depth", "warning", "fail", summary, "mailq")]
        return [CheckResult("queue.depth", "warning", "ok", summary)]

    async def check_disk(self) -> list[CheckResult]:
        path = statvfs_path(self.config.mailboxes_path)
        try:
            free_mb = await asyncio.to_thread(lambda: shutil.disk_usage(path).free // 2**20)
        except OSError as exc:
            return [CheckResult("disk.mailboxes", "critical", "unknown", f"{path}: {exc}")]
        summary = f"{free_mb} MB free on {path}"
        hint = "free space or grow the filesystem; chatmail-expire removes old mail"
        if free_mb < self.config.min_free_disk_space_mb:
            return [CheckResult("disk.mailboxes", "critical", "fail", summary, hint)]
        if free_mb < self.settings.disk_warn_mb:
            return [CheckResult("disk.mailboxes", "warning", "fail", summary, hint)]
        return [CheckResult("disk.mailboxes", "critical", "ok", summary)]

    async def check_registration(self, facts: Facts) -> list[CheckResult]:
        state = await self.creation_state()
        if state.closed:
            facts.registration_open = False
            reason = state.reason or "no reason given"
            until = (
                f" until {datetime.fromtimestamp(state.until, UTC).isoformat()}"
                if state.until
                else ""
            )
            return [
                CheckResult(
                    "registration.open",
                    "info",
                    "fail",
                    f"closed by {state.by or 'file'}{until}: {reason}",
                    'PUT /account-creation {"enabled": true} to re-open',
                )
            ]
        limit = await asyncio.to_thread(self.creation.system_limit)
        facts.registration_open = limit is None
        if limit:
            return [
                CheckResult(
                    "registration.open",
                    "warning",
                    "fail",
                    f"refused by system limit: {limit}",
                    "reduce load or free memory/disk, or raise the limit in chatmail.ini",
                )
            ]
        return [CheckResult("registration.open", "warning", "ok", "open")]

    async def check_version(self, facts: Facts) -> list[CheckResult]:
        path = self.settings.version_file
        try:
            version = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError as exc:
            return [
                CheckResult(
                    "version", "info", "unknown", f"{path}: {exc.strerror}", "deploy via salt"
                )
            ]
        facts.version = version[0][:100] if version else ""
        return [CheckResult("version", "info", "ok", facts.version or "(empty)")]

    async def check_dovecot_build(self) -> list[CheckResult]:
        """Which Dovecot is installed (the formula restarts Dovecot when it changes), and
        whether it is the build the pillar chose."""
        spec = self.settings.dovecot
        rc, stdout, stderr = await run_command(spec.version_command, self.settings.check_timeout_s)
        version = _first_line(stdout)
        if rc != 0 or not version:
            reason = _first_line(stderr) or f"exit {rc}"
            return [
                CheckResult("dovecot.build", "warning", "unknown", reason, "is Dovecot installed?")
            ]
        if PATCHED_DOVECOT_MARK in version:
            build = "patched"
        elif spec.upstream_version and version == spec.upstream_version:
            build = "upstream"
        else:
            build = "debian"
        what = {
            "patched": "our build, no IDLE notification delay",
            "upstream": "upstream's build, no IDLE notification delay",
            "debian": "not patched: 500 ms IDLE notification delay",
        }[build]
        summary = f"Dovecot {version} ({what})"
        if build != spec.packages:
            summary += f"; chatmail:dovecot:packages is {spec.packages}"
            hint = "apply the formula: it installs the Dovecot that pillar key names"
            return [CheckResult("dovecot.build", "warning", "fail", summary, hint)]
        return [CheckResult("dovecot.build", "warning", "ok", summary)]

    async def check_password_files(self) -> list[CheckResult]:
        """Accounts whose password file exists but is unusable: their logins fail
        temporarily (never re-created with the next password) until someone repairs them."""
        stats = self.account_stats
        if stats is None:
            return [
                CheckResult(
                    "accounts.password_files",
                    "warning",
                    "unknown",
                    "no account scan yet",
                    "the account-stats timer (python -m chatmail_api.accountstats) counts them",
                )
            ]
        count = stats.unusable_password_files
        if not count:
            return [
                CheckResult("accounts.password_files", "warning", "ok", "all password files usable")
            ]
        named = ", ".join(stats.unusable_password_examples)
        return [
            CheckResult(
                "accounts.password_files",
                "warning",
                "fail",
                f"{count} unusable password file{'s' if count > 1 else ''}: {named}"[:300],
                f"their logins fail temporarily: restore {self.config.mailboxes_path}"
                "/<address>/password from a backup or write a new hash into it "
                "(doveadm pw -s SHA512-CRYPT)",
            )
        ]

    def check_probe(self) -> CheckResult:
        result = self.probe_result
        if not self.settings.probe.enabled:
            return CheckResult("probe.e2e", "info", "unknown", "probe disabled in settings")
        if result is None:
            return CheckResult(
                "probe.e2e", "warning", "unknown", "no probe has run yet", "POST /probe"
            )
        if result.ok:
            return CheckResult(
                "probe.e2e", "critical", "ok", f"delivered in {result.duration_s:.2f} s"
            )
        if unprovable(result, self.config):
            return CheckResult(
                "probe.e2e",
                "warning",
                "unknown",
                f"not proven: account creation is closed and the probe account cannot log in "
                f"({result.detail[:120]})",
                'PUT /account-creation {"enabled": true} once, so the probe account exists',
            )
        return CheckResult(
            "probe.e2e",
            "critical",
            "fail",
            result.detail[:200],
            "mail does not flow: check postfix, filtermail, dovecot logs",
        )

    def check_dns(self) -> list[CheckResult]:
        report = self.dns_report
        if report is None:
            return []
        required = [r for r in report.records if r.required and r.state != "ok"]
        recommended = [r for r in report.records if not r.required and r.state != "ok"]
        policy_bad = report.mta_sts is not None and report.mta_sts.state != "ok"
        return [
            CheckResult(
                "dns.required",
                "warning",
                "fail" if required or policy_bad else "ok",
                (
                    "; ".join(f"{r.type} {r.name} {r.state}" for r in required)
                    + ("; MTA-STS policy wrong" if policy_bad else "")
                ).strip("; ")
                or "all required records correct",
                "GET /dns and GET /dns/zone show what to set" if required or policy_bad else "",
            ),
            CheckResult(
                "dns.recommended",
                "info",
                "fail" if recommended else "ok",
                "; ".join(f"{r.type} {r.name} {r.state}" for r in recommended)
                or "all recommended records correct",
                "GET /dns/zone shows the records" if recommended else "",
            ),
        ]


async def _guarded(ids: list[str], severity: str, fn, timeout: float) -> list[CheckResult]:
    """Run one check group; a timeout or crash turns its checks ``unknown``, not a 500."""
    try:
        return await asyncio.wait_for(fn(), timeout)
    except TimeoutError:
        summary = f"check timed out after {timeout:g} s"
    except Exception as exc:  # a check bug must not take /status down
        log.exception("check %s crashed", ids)
        summary = f"check failed: {type(exc).__name__}: {exc}"
    return [CheckResult(cid, severity, "unknown", summary) for cid in ids]


def overall(results: list[CheckResult]) -> str:
    """down: a critical check fails; degraded: a warning fails or a critical is unknown."""
    if any(r.state == "fail" and r.severity == "critical" for r in results):
        return "down"
    if any(
        (r.state == "fail" and r.severity == "warning")
        or (r.state == "unknown" and r.severity == "critical")
        for r in results
    ):
        return "degraded"
    return "ok"


class CheckStateStore:
    """``since`` per check id, persisted so a restart does not reset it."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict):
                self.entries = {k: v for k, v in data.items() if isinstance(v, dict)}
        except (OSError, ValueError):
            pass

    def update(self, results: list[CheckResult], now: float) -> dict[str, float]:
        changed = False
        since = {}
        for r in results:
            entry = self.entries.get(r.id)
            if entry is None or entry.get("state") != r.state:
                entry = {"state": r.state, "since": now}
                self.entries[r.id] = entry
                changed = True
            since[r.id] = float(entry.get("since", now))
        if changed:
            try:
                write_text_atomic(self.path, json.dumps(self.entries, sort_keys=True))
            except OSError as exc:
                log.warning("cannot persist check states to %s: %s", self.path, exc)
        return since
