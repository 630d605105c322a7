"""chatmail-metadata: Dovecot's IMAP METADATA dict (``mail_attribute_dict``).

Dict keys are ``priv/<mailbox-guid>/<name>`` (per account; the account is the request's
user field) and ``shared/<mailbox-guid>/<name>`` (server-wide). We serve:

- ``priv/…/devicetoken``: SETMETADATA adds a push token, GETMETADATA lists them
  space-joined. Tokens live in ``<maildir>/metadata.json`` as ``{token: unix_ts}`` and
  expire 90 days after they were last set.
- ``priv/…/messagenew``: set by Dovecot's LMTP Lua script for each arriving message;
  queues a push notification per token (see :mod:`chatmaild.notifier`).
- ``shared/…/vendor/vendor.dovecot/pvt/server/vendor/deltachat/<name>``: irohrelay,
  turn, maxsmtprecipients, appversions.

Everything else is not found (``N``); writes to unknown keys fail the transaction.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .config import DEFAULT_INI_PATH, EXIT_CONFIG, Config, config_for_main
from .counters import Counters
from .dictproxy import DictProxy
from .filedict import FileDict
from .notifier import QUEUE_DIRNAME, Notifier
from .turn import TURN_TIMEOUT_S, get_turn_credentials
from .user import User

log = logging.getLogger(__name__)

DEVICETOKEN_KEY = "devicetoken"
TOKEN_LIFETIME_S = 90 * 86400
# A timestamp slightly in the future is clock skew; far in the future is garbage.
TOKEN_MAX_FUTURE_S = 60
SHARED_VENDOR_PREFIX = "vendor/vendor.dovecot/pvt/server/vendor/deltachat/"
# Postfix's default smtpd_recipient_limit, which the relay keeps.
MAX_SMTP_RECIPIENTS = 1000
TURN_PORT = 3478
APPVERSIONS_PATH = Path(__file__).parent / "defaults" / "appversions.json"
APPVERSIONS_URL_PREFIXES = ("https://github.com/deltachat/", "https://download.delta.chat/")


# -- device tokens -----------------------------------------------------------------


def valid_tokens(stored: object, now: float) -> dict[str, float]:
    """The unexpired ``{token: ts}`` of a stored value; a legacy list counts as set now."""
    if isinstance(stored, list):
        return {t: now for t in stored if isinstance(t, str) and t}
    if not isinstance(stored, dict):
        return {}
    tokens = {}
    for token, ts in stored.items():
        if isinstance(ts, bool) or not isinstance(ts, (int, float)):
            continue
        if now - TOKEN_LIFETIME_S < ts < now + TOKEN_MAX_FUTURE_S:
            tokens[token] = ts
    return tokens


def is_valid_token(token: str) -> bool:
    # Tokens are returned space-joined, so whitespace would split one token into two.
    return bool(token) and not any(c.isspace() for c in token)


class Metadata:
    """Per-account device tokens in ``<maildir>/metadata.json``."""

    def __init__(self, mailboxes_dir: Path):
        self.mailboxes_dir = Path(mailboxes_dir)

    def _filedict(self, addr: str) -> FileDict:
        return FileDict(User(self.mailboxes_dir, addr).metadata_path)

    def add_token_to_addr(self, addr: str, token: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        filedict = self._filedict(addr)
        filedict.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with filedict.modify() as data:
            tokens = valid_tokens(data.get(DEVICETOKEN_KEY), now)
            tokens[token] = int(now)
            data[DEVICETOKEN_KEY] = tokens

    def remove_token_from_addr(self, addr: str, token: str) -> None:
        filedict = self._filedict(addr)
        if not filedict.path.exists():
            return
        now = time.time()
        with filedict.modify() as data:
            tokens = valid_tokens(data.get(DEVICETOKEN_KEY), now)
            tokens.pop(token, None)
            data[DEVICETOKEN_KEY] = tokens

    def get_tokens_for_addr(self, addr: str, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        return list(valid_tokens(self._filedict(addr).read().get(DEVICETOKEN_KEY), now))


# -- appversions -------------------------------------------------------------------


class InvalidAppversions(ValueError):
    """appversions.json does not follow the schema clients expect."""


def validate_appversions(data: object) -> None:
    """Raise InvalidAppversions unless ``data`` follows the appversions schema clients expect."""
    if not isinstance(data, dict) or set(data) != {"clients"}:
        raise InvalidAppversions("top level must be {'clients': [...]}")
    if not isinstance(data["clients"], list):
        raise InvalidAppversions("'clients' must be a list")
    client_ids = set()
    for client in data["clients"]:
        if not isinstance(client, dict) or set(client) != {"clientId", "sources"}:
            raise InvalidAppversions("each client needs exactly 'clientId' and 'sources'")
        if not isinstance(client["clientId"], str) or client["clientId"] in client_ids:
            raise InvalidAppversions(f"clientId must be a unique string: {client['clientId']!r}")
        client_ids.add(client["clientId"])
        if not isinstance(client["sources"], list):
            raise InvalidAppversions("'sources' must be a list")
        source_ids = set()
        for source in client["sources"]:
            keys = {"sourceId", "versionInteger", "versionString", "downloadUrl"}
            if not isinstance(source, dict) or set(source) != keys:
                raise InvalidAppversions(f"each source needs exactly {sorted(keys)}")
            if not isinstance(source["sourceId"], str) or source["sourceId"] in source_ids:
                raise InvalidAppversions(
                    f"sourceId must be a unique string: {source['sourceId']!r}"
                )
            source_ids.add(source["sourceId"])
            version = source["versionInteger"]
            if isinstance(version, bool) or not isinstance(version, int):
                raise InvalidAppversions("versionInteger must be an integer")
            if not 0 <= version < 2**32:
                raise InvalidAppversions("versionInteger must be within 0..2^32-1")
            if not isinstance(source["versionString"], str):
                raise InvalidAppversions("versionString must be a string")
            url = source["downloadUrl"]
            if not isinstance(url, str) or not url.startswith(APPVERSIONS_URL_PREFIXES):
                raise InvalidAppversions(f"downloadUrl must start with {APPVERSIONS_URL_PREFIXES}")


def read_appversions(path: Path = APPVERSIONS_PATH) -> str | None:
    """The appversions JSON as one line, or None (logged) if missing or invalid."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        validate_appversions(data)
    except (OSError, ValueError) as exc:
        log.warning("not serving appversions from %s: %s", path, exc)
        return None
    return json.dumps(data, separators=(",", ":"))


# -- the dict ----------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataKey:
    scope: Literal["priv", "shared"]
    mailbox_guid: str
    name: str


def parse_key(key: str) -> MetadataKey | None:
    """``priv/<guid>/devicetoken`` -> MetadataKey; None for any other shape."""
    parts = key.split("/", 2)
    if len(parts) != 3 or parts[0] not in ("priv", "shared") or not parts[2]:
        return None
    return MetadataKey(scope=parts[0], mailbox_guid=parts[1], name=parts[2])


class MetadataDictProxy(DictProxy):
    def __init__(
        self,
        config: Config,
        metadata: Metadata,
        notifier: Notifier,
        *,
        appversions_path: Path = APPVERSIONS_PATH,
        turn_timeout: float = TURN_TIMEOUT_S,
    ):
        self.config = config
        self.metadata = metadata
        self.notifier = notifier
        self.appversions_path = appversions_path
        self.turn_timeout = turn_timeout

    def lookup(self, key: str, user: str) -> str | None:
        parsed = parse_key(key)
        if parsed is None:
            return None
        if parsed.scope == "priv":
            if parsed.name == DEVICETOKEN_KEY:
                return " ".join(self.metadata.get_tokens_for_addr(user))
            return None
        if not parsed.name.startswith(SHARED_VENDOR_PREFIX):
            return None
        name = parsed.name[len(SHARED_VENDOR_PREFIX) :]
        if name == "irohrelay":
            return self.config.iroh_relay_url or None
        if name == "turn":
            return self.turn_lookup()
        if name == "maxsmtprecipients":
            return str(MAX_SMTP_RECIPIENTS)
        if name == "appversions":
            return read_appversions(self.appversions_path)
        return None

    def turn_lookup(self) -> str | None:
        try:
            credentials = get_turn_credentials(self.config.turn_socket_path, self.turn_timeout)
        except Exception as exc:  # noqa: BLE001 - no TURN server means "no TURN", not a failure
            log.warning("no TURN credentials from %s: %s", self.config.turn_socket_path, exc)
            return None
        return f"{self.config.address_domain}:{TURN_PORT}:{credentials}"

    def set(self, user: str, key: str, value: str) -> bool:
        parsed = parse_key(key)
        if parsed is None or parsed.scope != "priv":
            log.warning("refusing to set unknown metadata key %r", key)
            return False
        if parsed.name == DEVICETOKEN_KEY:
            token = value.strip()
            if not is_valid_token(token):
                log.warning("refusing empty or whitespace-containing device token")
                return False
            self.metadata.add_token_to_addr(user, token)
            return True
        if parsed.name == "messagenew":
            self.notifier.new_message_for_addr(user)
            return True
        log.warning("refusing to set unknown metadata key %r", key)
        return False


# -- process -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatmail-metadata", description="IMAP METADATA dict and push notifier"
    )
    parser.add_argument("socket", help="UNIX socket to listen on")
    parser.add_argument("ini", nargs="?", default=str(DEFAULT_INI_PATH), help="chatmail.ini")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    mailboxes = config.mailboxes_path
    if not mailboxes.is_dir():
        log.error("mailboxes directory %s does not exist", mailboxes)
        return 1
    queue_dir = mailboxes / QUEUE_DIRNAME
    queue_dir.mkdir(mode=0o700, exist_ok=True)
    metadata = Metadata(mailboxes)
    counters = Counters(config.counters_dir, "metadata")
    notifier = Notifier(queue_dir, metadata, config.push_notification_url, counters)
    notifier.requeue_persistent_items()
    notifier.start()
    # Unsent notifications need nothing at exit: they are on disk already.
    try:
        MetadataDictProxy(config, metadata, notifier).serve_forever(args.socket)
    finally:
        counters.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
