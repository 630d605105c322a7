"""The control API's own settings: one JSON file (``api.json``) rendered by Salt.

Everything about the relay itself (domain, paths, limits) comes from chatmail.ini via
``chatmaild.config``; this file only holds what the API adds: where it listens, who may
call it, what it checks and how often. Paths, unit names and ports the formula decides
(salt/chatmail/api renders them) have no default here: they come from the file only, and
tests pass them explicitly.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class SettingsError(ValueError):
    """A settings file that cannot be used; one line per problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Tokens(_Strict):
    """Named bearer tokens per scope: ``{"monitor": {"grafana": "..."}, "admin": {...}}``."""

    monitor: dict[str, str] = {}
    admin: dict[str, str] = {}

    @field_validator("monitor", "admin")
    @classmethod
    def _long_enough(cls, tokens: dict[str, str]) -> dict[str, str]:
        for name, token in tokens.items():
            if len(token) < 16:
                raise ValueError(f"token {name!r} is shorter than 16 characters")
        return tokens


class ServiceSpec(_Strict):
    name: str
    severity: Literal["critical", "warning", "info"] = "critical"


class PortSpec(_Strict):
    port: int = Field(gt=0, lt=65536)
    host: str = "127.0.0.1"
    severity: Literal["critical", "warning", "info"] = "critical"
    what: str = ""


class DnsSettings(_Strict):
    #: ``IP`` or ``IP:PORT`` of the recursive resolver used to find the authoritative
    #: servers; empty means the system resolver (/etc/resolv.conf).
    resolver: str = ""
    #: Port the authoritative servers are queried on (53 in real life, a test port in tests).
    authoritative_port: int = Field(53, gt=0, lt=65536)
    timeout_s: float = Field(3.0, gt=0)
    #: Addresses the A/AAAA records must hold; empty means "any address is fine".
    expected_ipv4: list[ipaddress.IPv4Address] = []
    expected_ipv6: list[ipaddress.IPv6Address] = []
    dkim_selector: str
    #: The public half of the DKIM key (opendkim's ``<selector>.txt``).
    dkim_txt: Path
    #: Where the TXT is unreadable, the key is derived from the private key if this is set.
    dkim_private_key: Path | None = None
    acme_account_uri: str = ""
    mta_sts_port: int = Field(443, gt=0, lt=65536)
    #: CA bundle for the MTA-STS policy fetch; empty means the system's CAs.
    mta_sts_cafile: Path | None = None
    #: How often the background task re-checks DNS for /status (0: only on GET /dns).
    check_interval_s: float = Field(3600.0, ge=0)


class ProbeSettings(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    submission_port: int = Field(gt=0, lt=65536)
    imap_port: int = Field(gt=0, lt=65536)
    #: The relay's own certificate is checked by the TLS check, not by the probe.
    verify_tls: bool = False
    timeout_s: float = Field(30.0, gt=0)
    interval_s: float = Field(ge=0)
    #: First retry of a failed scheduled probe; doubled per failure up to interval_s.
    retry_s: float = Field(30.0, gt=0)


class NewAccountSettings(_Strict):
    """Rate limit of the public ``/new`` endpoint per client address (token bucket)."""

    rate_per_s: float = Field(2.0, gt=0)
    burst: int = Field(5, ge=1)


class DovecotSettings(_Strict):
    """Which Dovecot build the formula installed (chatmail:dovecot:packages)."""

    packages: Literal["debian", "patched", "upstream"] = "debian"
    #: Prints the installed Dovecot's version (``dpkg-query`` on Debian).
    version_command: list[str]
    #: The version upstream's packages carry (chatmail:dovecot:upstream:version).
    upstream_version: str = ""


class Settings(_Strict):
    chatmail_ini: Path
    listen: str
    port: int = Field(gt=0, lt=65536)
    #: Probe credentials, check states, audit log. Root-only readable parts stay 0600.
    state_dir: Path
    tokens: Tokens = Tokens()
    #: More tokens, same JSON shape as ``tokens``: on the relay a root-only file that
    #: systemd hands to the service (LoadCredential), so api.json holds no secrets.
    tokens_file: Path | None = None
    #: Client networks allowed to use authenticated endpoints besides loopback; empty: any.
    allow: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    #: /health without a token for everyone; false: only for loopback clients (local
    #: monitoring), others (e.g. forwarded by nginx) need a monitor token.
    public_health: bool = False
    #: Peers whose X-Forwarded-For is believed (nginx on the same host). A request
    #: carrying it is never local (no /health or allow-list privileges of loopback).
    trusted_proxies: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [
        ipaddress.IPv4Address("127.0.0.1"),
        ipaddress.IPv6Address("::1"),
    ]
    #: true/false: account creation is pinned open/closed by the pillar; PUT answers 409.
    account_creation_pin: bool | None = None
    version_file: Path
    #: Certificate checked for expiry (the one Postfix, Dovecot and nginx serve).
    tls_cert: Path
    tls_warn_days: int = Field(14, ge=0)
    tls_fail_days: int = Field(3, ge=0)
    service_manager: Literal["systemd", "rcctl"]
    #: The relay's MTA: which ports the checks expect (filtermail's only with Postfix).
    mta: Literal["postfix", "opensmtpd"]
    services: list[ServiceSpec]
    #: Ports that must accept connections; empty: derived from chatmail.ini.
    ports: list[PortSpec] = []
    #: coturn's STUN/TURN port, probed on loopback (check ``turn.stun``); None: no TURN.
    turn_port: int | None = Field(None, gt=0, lt=65536)
    #: Prints the queue; ``postqueue -j`` (Postfix JSON) or ``smtpctl show queue``.
    queue_command: list[str]
    #: Read ``smtpctl show queue`` output from this file instead of running
    #: queue_command: OpenSMTPD lists its queue to root only, so a root timer writes it.
    queue_snapshot: Path | None = None
    #: An older snapshot means the timer stopped: the check turns ``unknown``.
    queue_snapshot_max_age_s: float = Field(300.0, gt=0)
    queue_warn: int = Field(100, ge=0)
    queue_fail: int = Field(1000, ge=0)
    #: Free space below this many MB on the mailbox filesystem is a warning (the
    #: failure threshold is chatmail.ini's min_free_disk_space).
    disk_warn_mb: int = Field(5120, ge=0)
    check_timeout_s: float = Field(3.0, gt=0)
    status_cache_s: float = Field(5.0, ge=0)
    #: How often accounts and storage are counted for /metrics (a directory walk).
    account_scan_interval_s: float = Field(ge=0)
    #: Read the counts from this file (written by ``chatmail-accountstats`` as the mailbox
    #: owner) instead of walking mailboxes the API user cannot read; None: walk them.
    account_stats_file: Path | None
    #: The account list chatmail-accountstats writes (GET /accounts); None: no listing.
    account_index_file: Path | None = None
    #: Sockets of chatmail-adminctl (accounts: as vmail; queue: as root); None: the
    #: routes needing them answer 503.
    accounts_socket: Path | None = None
    queue_socket: Path | None = None
    admin_timeout_s: float = Field(30.0, gt=0)
    #: How often an expired ``until`` re-opens account creation without a request.
    reopen_interval_s: float = Field(30.0, gt=0)
    dns: DnsSettings
    probe: ProbeSettings
    new_account: NewAccountSettings = NewAccountSettings()
    #: None: no check of the Dovecot build.
    dovecot: DovecotSettings | None = None

    @property
    def probe_credentials_path(self) -> Path:
        return self.state_dir / "probe-account.json"

    @property
    def check_state_path(self) -> Path:
        return self.state_dir / "check-state.json"

    @property
    def audit_log_path(self) -> Path:
        return self.state_dir / "audit.log"


def parse_settings(data: object) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"]) or "settings"
            lines.append(f"api settings: {key}: {error['msg']}")
        raise SettingsError("\n".join(lines)) from None


def _read_json(path: str | Path, what: str) -> object:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SettingsError(f"api {what}: cannot read {path}: {exc}") from None


def load_settings(path: str | Path, tokens_file: str | Path | None = None) -> Settings:
    """Read and validate the JSON settings, adding the tokens of ``tokens_file``."""
    settings = parse_settings(_read_json(path, "settings"))
    tokens_file = tokens_file or settings.tokens_file
    if tokens_file is None:
        return settings
    try:
        extra = Tokens.model_validate(_read_json(tokens_file, "tokens"))
    except ValidationError as exc:
        raise SettingsError(f"api tokens: {tokens_file}: {exc.errors()[0]['msg']}") from None
    tokens = Tokens(
        monitor={**settings.tokens.monitor, **extra.monitor},
        admin={**settings.tokens.admin, **extra.admin},
    )
    return settings.model_copy(update={"tokens": tokens})
