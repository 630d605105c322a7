"""Platforms, pillars and helpers shared by the Salt test modules.

A module of its own (not conftest.py) so test modules can import it by a name no other
test folder uses: ``from conftest import ...`` picks whichever conftest was imported last.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml
from chroots import CACHE_DIR

REPO = Path(__file__).resolve().parents[2]
SALT_VENV = CACHE_DIR / "salt-venv"
# Salt 3006 is the oldest LTS with the functions we use (slsutil.merge, file.get_managed).
SALT_MIN_MAJOR = 3006

TRIXIE_PACKAGES = [
    "dovecot-core",
    "dovecot-imapd",
    "dovecot-lmtpd",
    "dovecot-auth-lua",
    "opensmtpd",
    "opensmtpd-filter-dkimsign",
    "nginx",
    "libnginx-mod-stream",
    "unbound",
]

PLATFORMS = {
    "debian12": {
        "os_family": "Debian",
        "os": "Debian",
        "osfinger": "Debian-12",
        "osrelease": "12",
        "osmajorrelease": 12,
        "oscodename": "bookworm",
    },
    "debian13": {
        "os_family": "Debian",
        "os": "Debian",
        "osfinger": "Debian-13",
        "osrelease": "13",
        "osmajorrelease": 13,
        "oscodename": "trixie",
    },
    "ubuntu2404": {
        "os_family": "Debian",
        "os": "Ubuntu",
        "osfinger": "Ubuntu-24.04",
        "osrelease": "24.04",
        "osmajorrelease": 24,
        "oscodename": "noble",
    },
}


def _example_pillar() -> dict:
    return yaml.safe_load((REPO / "pillar.example").read_text())


PILLARS = {
    # pillar.example as shipped: acme (acmetool), IPv6, the defaults.
    "example": _example_pillar,
    # A test relay: _-domain (self-signed), IPv4 only, forwarding resolver, creation
    # pinned off, certbot never used.
    "underscore": lambda: {
        "chatmail": {
            "mail_domain": "_chat.test",
            "version": "v1.2.3-4-gdeadbee",
            "ipv6": False,
            "dns_forwarder": "192.0.2.53",
            "settings": {"max_mailbox_size": "2G", "privacy_mail": "privacy@chat.test"},
            "api": {"account_creation_pin": False},
        }
    },
    # External certificate, IMAP COMPRESS and rawlog, certbot as the (unused) client.
    "external": lambda: {
        "chatmail": {
            "mail_domain": "mail.example.net",
            "tls": {"cert": "/etc/relay-tls/fullchain.pem", "key": "/etc/relay-tls/key.pem"},
            "settings": {"imap_compress": True, "imap_rawlog": True, "max_smtp_connections": 50},
            "api": {"account_creation_pin": True},
        }
    },
    # acme with certbot.
    "certbot": lambda: {
        "chatmail": {"mail_domain": "chat.example.com", "tls": {"acme_client": "certbot"}},
    },
}


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)


class RenderError(RuntimeError):
    pass
