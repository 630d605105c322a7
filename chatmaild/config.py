"""The relay's one configuration: ``chatmail.ini`` with a ``[params]`` section.

The file format is upstream chatmail's, so an upstream operator's ini (and upstream's
online test suite) reads it. Values are validated by one pydantic model; a bad value gives
one line naming the key, unknown keys are collected in ``Config.unused_keys``.
"""

from __future__ import annotations

import configparser
import ipaddress
import logging
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_INI_PATH = Path("/usr/local/lib/chatmaild/chatmail.ini")

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmgt]?)b?\s*$", re.IGNORECASE)
_SIZE_FACTOR_MB = {"k": 1 / 1024, "": 1, "m": 1, "g": 1024, "t": 1024 * 1024}


class ConfigError(ValueError):
    """A chatmail.ini that cannot be used; the message is one line per problem."""


def parse_size_mb(value: str) -> int:
    """``500M`` -> 500, ``2G`` -> 2048, `` 1g `` -> 1024, ``100MB`` -> 100, ``256`` -> 256."""
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"not a size like 500M or 2G: {value!r}")
    number, unit = match.groups()
    return int(int(number) * _SIZE_FACTOR_MB[unit.lower()])


def _truthy(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off", ""):
        return False
    raise ValueError(f"not a boolean (true/false): {value!r}")


class Config(BaseModel):
    """Every ``[params]`` key of chatmail.ini, with upstream 1.12 defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mail_domain: str
    max_user_send_per_minute: int = Field(60, gt=0)
    max_user_send_burst_size: int = Field(10, gt=0)
    max_mailbox_size: str = "500M"
    max_message_size: int = Field(31457280, gt=0)
    delete_mails_after: int = Field(20, gt=0)
    delete_large_after: int = Field(7, gt=0)
    delete_inactive_users_after: int = Field(90, gt=0)
    username_min_length: int = Field(9, ge=1)
    username_max_length: int = Field(9, ge=1, le=64)
    password_min_length: int = Field(9, ge=1)
    max_load_1m: float = Field(5.0, gt=0)
    min_available_memory: str = "200M"
    min_free_disk_space: str = "1G"
    max_imap_connections: int = Field(10000, gt=0)
    max_smtp_connections: int = Field(1000, gt=0)
    tls_external_cert_and_key: str = ""
    www_folder: str = ""
    disable_ipv6: bool = False
    acme_email: str = ""
    iroh_relay: str | None = None
    mtail_address: str | None = None
    imap_rawlog: bool = False
    imap_compress: bool = False
    privacy_postal: str = ""
    privacy_mail: str = ""
    privacy_pdo: str = ""
    privacy_supervisor: str = ""
    filtermail_smtp_port: int = Field(10080, gt=0, lt=65536)
    filtermail_smtp_port_incoming: int = Field(10081, gt=0, lt=65536)
    filtermail_http_port_incoming: int = Field(10082, gt=0, lt=65536)
    filtermail_lmtp_port_transport: int = Field(10083, gt=0, lt=65536)
    postfix_reinject_port: int = Field(10025, gt=0, lt=65536)
    postfix_reinject_port_incoming: int = Field(10026, gt=0, lt=65536)
    # Keys of ours for relay-to-relay HTTPS delivery (chatmaild.mxtransport): Postfix's
    # loopback listener that queues mail for its SMTP client (the fallback channel), and
    # how long an MX host that failed over HTTPS is left alone (upstream: 30 minutes).
    postfix_reinject_port_smtp: int = Field(10027, gt=0, lt=65536)
    mxdeliv_retry_after: int = Field(1800, ge=0)
    turn_socket_path: Path = Path("/run/chatmail-turn/turn.socket")
    mailboxes_dir: Path | None = None
    passdb_path: Path = Path("/home/vmail/passdb.sqlite")
    # Keys of ours (upstream hard-codes or derives these); an upstream ini omits them.
    #: The TLS mode the formula chose (pillar tls:mode); None: derived as upstream does.
    tls_mode: Literal["acme", "self", "external"] | None = None
    filtermail_host: str = "127.0.0.1"
    postfix_host: str = "127.0.0.1"
    nocreate_file: Path = Path("/etc/chatmail-nocreate")
    dns_resolver: str = ""
    push_notification_url: str = "https://notifications.delta.chat/notify"
    counters_dir: Path = Path("/var/lib/chatmail/counters")
    #: Blocked and deleted addresses (chatmaild.blocklist); written by chatmail-adminctl.
    blocklist_file: Path = Path("/var/lib/chatmail/blocklist/blocked.json")
    # OpenSMTPD's submission filter: a client address with this many failed SMTP logins
    # within the window (seconds) gets "421" for its next AUTH until they age out.
    smtpd_auth_failures_max: int = Field(10, ge=1)
    smtpd_auth_failures_window: int = Field(600, gt=0)
    # OpenBSD's smtpd checks SMTP passwords itself with crypt_checkpass(3), which only
    # knows bcrypt: relays whose MTA is OpenSMTPD on OpenBSD store BLF-CRYPT hashes.
    password_scheme: Literal["SHA512-CRYPT", "BLF-CRYPT"] = "SHA512-CRYPT"

    @field_validator("disable_ipv6", "imap_rawlog", "imap_compress", mode="before")
    @classmethod
    def _bool(cls, value: object) -> bool:
        return _truthy(value)

    @field_validator("max_mailbox_size", "min_available_memory", "min_free_disk_space")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size_mb(value)
        return value

    @field_validator("mail_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        value = value.strip()
        if not value or any(c.isspace() for c in value) or "/" in value or "@" in value:
            raise ValueError(f"not a domain name or IPv4 address: {value!r}")
        return value

    @field_validator("tls_external_cert_and_key")
    @classmethod
    def _cert_and_key(cls, value: str) -> str:
        if value.strip() and len(value.split()) != 2:
            raise ValueError("must be two space-separated paths: CERT_PATH KEY_PATH")
        return value.strip()

    @model_validator(mode="after")
    def _lengths(self) -> Config:
        if self.username_min_length > self.username_max_length:
            raise ValueError("username_min_length is larger than username_max_length")
        return self

    @model_validator(mode="after")
    def _tls_files_match_mode(self) -> Config:
        if self.tls_mode is None:
            return self
        if (self.tls_mode == "external") != bool(self.tls_external_cert_and_key):
            raise ValueError(
                "tls_mode is external exactly when tls_external_cert_and_key is set,"
                f" but tls_mode = {self.tls_mode}"
            )
        return self

    # -- derived values --------------------------------------------------------------

    @property
    def mail_domain_bare(self) -> str:
        return self.mail_domain

    @property
    def ipv4_relay(self) -> str | None:
        """The relay's IPv4 address when ``mail_domain`` is a bare IP, else None."""
        try:
            return str(ipaddress.IPv4Address(self.mail_domain))
        except ValueError:
            return None

    @property
    def address_domain(self) -> str:
        """The part after ``@`` in the relay's addresses (``[1.2.3.4]`` for IPv4 relays)."""
        return f"[{self.ipv4_relay}]" if self.ipv4_relay else self.mail_domain

    @property
    def tls_cert_mode(self) -> Literal["acme", "self", "external"]:
        """``tls_mode`` as written by the formula; upstream's rule for an ini without it."""
        if self.tls_mode:
            return self.tls_mode
        if self.tls_external_cert_and_key:
            return "external"
        if self.ipv4_relay or self.mail_domain.startswith("_"):
            return "self"
        return "acme"

    @property
    def mailboxes_path(self) -> Path:
        return self.mailboxes_dir or Path("/home/vmail/mail") / self.mail_domain

    @property
    def max_mailbox_size_mb(self) -> int:
        return parse_size_mb(self.max_mailbox_size)

    @property
    def min_available_memory_mb(self) -> int:
        return parse_size_mb(self.min_available_memory)

    @property
    def min_free_disk_space_mb(self) -> int:
        return parse_size_mb(self.min_free_disk_space)

    @property
    def enable_iroh_relay(self) -> bool:
        return self.iroh_relay is None

    @property
    def iroh_relay_url(self) -> str:
        """The iroh relay advertised to clients; empty means none."""
        if self.iroh_relay is None:
            return f"https://{self.mail_domain}"
        return self.iroh_relay


class LoadedConfig(BaseModel):
    """A validated config plus what the file held that no setting reads."""

    config: Config
    unused_keys: tuple[str, ...] = ()


def parse_params(params: dict[str, str]) -> LoadedConfig:
    """Validate ``[params]`` values; unknown keys are returned, not fatal."""
    known = set(Config.model_fields)
    unused = tuple(sorted(k for k in params if k not in known))
    values = {k: v for k, v in params.items() if k in known and v.strip() != ""}
    # Keys whose empty value means something: keep them.
    for key in ("iroh_relay", "tls_external_cert_and_key", "www_folder", "dns_resolver"):
        if key in params and params[key].strip() == "":
            values[key] = ""
    try:
        config = Config(**values)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            key = ".".join(str(p) for p in error["loc"]) or "params"
            given = params.get(key)
            shown = f" (got {given!r})" if given is not None else ""
            lines.append(f"chatmail.ini: {key}: {error['msg']}{shown}")
        raise ConfigError("\n".join(lines)) from None
    return LoadedConfig(config=config, unused_keys=unused)


def load_config(path: str | Path) -> LoadedConfig:
    """Read and validate a chatmail.ini file."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=None)
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise ConfigError(f"chatmail.ini: cannot read {path}: {exc}") from None
    if not parser.has_section("params"):
        raise ConfigError(f"chatmail.ini: {path} has no [params] section")
    return parse_params(dict(parser.items("params")))


def read_config(path: str | Path) -> Config:
    """Read chatmail.ini, logging keys that have no effect."""
    loaded = load_config(path)
    if loaded.unused_keys:
        logging.getLogger("chatmaild.config").warning(
            "chatmail.ini contains settings that have no effect: %s", ", ".join(loaded.unused_keys)
        )
    return loaded.config


#: Exit status of a command whose chatmail.ini cannot be used (as for argparse's usage errors).
EXIT_CONFIG = 2


def config_for_main(path: str | Path) -> Config | None:
    """chatmail.ini for a command's ``main()``; None, after logging why, if it is unusable.

    Every console script then exits with :data:`EXIT_CONFIG`, so units and smtpd see one
    status for "fix the configuration".
    """
    try:
        return read_config(path)
    except ConfigError as exc:
        logging.getLogger("chatmaild.config").error("%s", exc)
        return None


def render_ini(params: dict[str, object]) -> str:
    """Render a ``[params]`` section; the inverse of :func:`load_config` for tests and tools."""
    lines = ["[params]"]
    for key, value in params.items():
        if isinstance(value, bool):
            value = "true" if value else "false"
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"
