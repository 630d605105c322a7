"""lastlogin: records each account's last IMAP login, rounded down to the UTC day.

Dovecot's ``last_login`` plugin writes through the dict protocol::

    plugin {
      last_login_dict = proxy:/run/chatmail-lastlogin/lastlogin.socket:lastlogin
      last_login_precision = s
    }

Each login commits a transaction setting ``shared/last-login/<addr>`` to a unix
timestamp; the day lands as the mtime of the account's ``password`` file, which is what
``chatmail-expire`` reads to delete inactive accounts. Each one counts as a login in
``logins_total`` (the API's ``chatmail_logins_total``).

Usage: ``lastlogin SOCKET INI``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from .config import EXIT_CONFIG, Config, config_for_main
from .counters import Counters
from .dictproxy import DictProxy
from .user import InvalidAddress, User

log = logging.getLogger(__name__)

LAST_LOGIN_PREFIX = "shared/last-login/"


def parse_last_login(key: str, value: str) -> tuple[str, int]:
    """``shared/last-login/<addr>`` + ``<unix seconds>`` -> (addr, timestamp)."""
    if not key.startswith(LAST_LOGIN_PREFIX):
        raise ValueError(f"not a last-login key: {key!r}")
    timestamp = int(value.strip())
    if timestamp < 0:
        raise ValueError(f"negative timestamp {timestamp}")
    return key[len(LAST_LOGIN_PREFIX) :], timestamp


class LastLoginDictProxy(DictProxy):
    def __init__(self, config: Config, counters: Counters | None = None):
        self.config = config
        self.counters = counters

    def set(self, user: str, key: str, value: str) -> bool:
        try:
            addr, timestamp = parse_last_login(key, value)
            account = User(self.config.mailboxes_path, addr)
        except (ValueError, InvalidAddress) as exc:
            log.warning("ignoring last-login write: %s", exc)
            return False
        account.set_last_login_timestamp(timestamp)
        if self.counters is not None:
            self.counters.inc("logins_total")
        return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) != 2:
        log.error("usage: lastlogin SOCKET INI")
        return 2
    config = config_for_main(argv[1])
    if config is None:
        return EXIT_CONFIG
    counters = Counters(config.counters_dir, "lastlogin")
    try:
        LastLoginDictProxy(config, counters).serve_forever(Path(argv[0]))
    finally:
        counters.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
