"""Fresh credentials for a new account (the API's ``POST /new``, ``chatmail-newcreds``).

Nothing is created here: the account comes into being at its first login (doveauth).
Self-signed relays also get a ``dclogin:`` URL, because Delta Chat can only be told to
accept their certificate (``ic=3``) through such a URL.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import string
import sys
from urllib.parse import quote

from pydantic import BaseModel

from .config import DEFAULT_INI_PATH, EXIT_CONFIG, Config, config_for_main

LOCALPART_ALPHABET = string.ascii_lowercase + string.digits
PASSWORD_ALPHABET = string.ascii_letters + string.digits + string.punctuation
# Above the minimum, so a password is never refused for being one character short.
PASSWORD_EXTRA_LENGTH = 3


class Credentials(BaseModel):
    email: str
    password: str
    dclogin_url: str | None = None


def make_dclogin_url(config: Config, email: str, password: str) -> str:
    """``dclogin:`` URL accepting the relay's self-signed certificate (``ic=3``)."""
    url = f"dclogin:{quote(email, safe='@[]')}?p={quote(password, safe='')}&v=1"
    if config.ipv4_relay:
        url += f"&ih={config.ipv4_relay}&sh={config.ipv4_relay}"
    return url + "&ic=3"


def create_credentials(config: Config) -> Credentials:
    localpart = "".join(
        secrets.choice(LOCALPART_ALPHABET) for _ in range(config.username_max_length)
    )
    password = "".join(
        secrets.choice(PASSWORD_ALPHABET)
        for _ in range(config.password_min_length + PASSWORD_EXTRA_LENGTH)
    )
    email = f"{localpart}@{config.address_domain}"
    dclogin_url = None
    if config.tls_cert_mode == "self":
        dclogin_url = make_dclogin_url(config, email, password)
    return Credentials(email=email, password=password, dclogin_url=dclogin_url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="chatmail-newcreds", description="Print fresh account credentials as JSON."
    )
    parser.add_argument("ini", nargs="?", default=str(DEFAULT_INI_PATH), help="chatmail.ini")
    args = parser.parse_args(argv)
    # stdout is the credentials' JSON: anything else goes to stderr
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    config = config_for_main(args.ini)
    if config is None:
        return EXIT_CONFIG
    print(create_credentials(config).model_dump_json(exclude_none=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
