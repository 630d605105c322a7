"""Fixtures for the web pages: a built site for a public and for a self-signed relay."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from chatmail_www.build import build
from www_helpers import CONTACTS, SETTINGS

from chatmaild.config import Config

RELAYS = {
    "public": ("chat.example.org", CONTACTS),
    "self": ("_relay.test", {}),
}


@dataclass
class Site:
    config: Config
    ini: Path
    out: Path


@pytest.fixture
def make_site(tmp_path, make_config):
    """``make_site("public" | "self")``: the default pages built for that kind of relay."""

    def make(kind: str) -> Site:
        domain, contacts = RELAYS[kind]
        config = make_config(domain, **SETTINGS, **contacts)
        ini = tmp_path / "chatmail.ini"
        out = tmp_path / "www"
        build(ini, out)
        return Site(config=config, ini=ini, out=out)

    return make


@pytest.fixture(params=sorted(RELAYS))
def site(request, make_site) -> Site:
    """Parametrized over a public-certificate relay and a self-signed one."""
    return make_site(request.param)


@pytest.fixture
def public_site(make_site) -> Site:
    return make_site("public")


@pytest.fixture
def self_site(make_site) -> Site:
    return make_site("self")
