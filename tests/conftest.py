"""Fixtures shared by every test package."""

from __future__ import annotations

import secrets
import string
from pathlib import Path

import pytest

from chatmaild.config import Config, load_config, render_ini

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The Salt render harness (fixtures salt_python, render, trixie_root, ...), for every folder.
pytest_plugins = ["saltsupport"]


@pytest.fixture
def make_config(tmp_path: Path):
    """Write a chatmail.ini under tmp_path and load it: ``make_config("chat.example.org", ...)``.

    Mailboxes, counters and the nocreate file live under tmp_path, so tests never touch
    the host's /etc or /home.
    """

    def make(mail_domain: str = "chat.example.org", **overrides: object) -> Config:
        params: dict[str, object] = {
            "mail_domain": mail_domain,
            "mailboxes_dir": tmp_path / "mailboxes",
            "counters_dir": tmp_path / "counters",
            "nocreate_file": tmp_path / "chatmail-nocreate",
            "blocklist_file": tmp_path / "blocked.json",
            "passdb_path": tmp_path / "passdb.sqlite",
        }
        params.update(overrides)
        ini = tmp_path / "chatmail.ini"
        ini.write_text(render_ini(params))
        (tmp_path / "mailboxes").mkdir(exist_ok=True)
        return load_config(ini).config

    return make


#: System limits that never block account creation, even on a busy shared test host.
RELAXED_LIMITS = {"max_load_1m": 99999, "min_available_memory": "0", "min_free_disk_space": "0"}


@pytest.fixture
def make_relaxed_config(make_config):
    """``make_config`` with :data:`RELAXED_LIMITS`, so only the rule under test can refuse."""

    def make(mail_domain: str = "chat.example.org", **overrides: object) -> Config:
        return make_config(mail_domain, **{**RELAXED_LIMITS, **overrides})

    return make


@pytest.fixture
def example_config(make_relaxed_config) -> Config:
    """chat.example.org with upstream's account rules and relaxed system limits."""
    return make_relaxed_config()


@pytest.fixture
def ini_path(tmp_path: Path, make_config) -> Path:
    """Path of the chatmail.ini written by ``make_config`` (call make_config first)."""
    return tmp_path / "chatmail.ini"


@pytest.fixture
def gencreds():
    """Fresh (localpart, password) pairs that satisfy the default account rules."""

    def gen(length: int = 9) -> tuple[str, str]:
        alphabet = string.ascii_lowercase + string.digits
        user = "".join(secrets.choice(alphabet) for _ in range(length))
        password = "".join(secrets.choice(alphabet) for _ in range(12))
        return user, password

    return gen


@pytest.fixture(scope="module")
def dns_server(tmp_path_factory: pytest.TempPathFactory):
    """A real authoritative DNS server (NSD) on 127.0.0.1:<free port>; see tests/dnsserver.py.

    ``dns_server.set_zone("example.org", ['sel._domainkey TXT "v=DKIM1; ..."'])`` serves
    records; ``dns_server.address`` ("127.0.0.1:PORT") goes into ``dns_resolver``. One
    server per test module (starting NSD takes ~0.5 s): tests set the zones they read.
    """
    from dnsserver import DNSServer

    with DNSServer(tmp_path_factory.mktemp("nsd")) as server:
        yield server
