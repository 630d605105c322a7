"""The one Salt render harness: Salt's venv, platforms, pillars and the ``render`` fixture.

A pytest plugin (tests/conftest.py loads it), so every test folder renders the formula
the same way with the same Salt:

- ``salt_python``: Salt in its own venv under the test cache (``pip install`` of
  :data:`SALT_REQUIREMENT` once, ~70 s; Salt is no dependency of the project venv).
- ``render(platform, name, pillar=None, grains=None) -> Rendered``: compiles the formula
  for a platform's grains and a pillar and renders every managed file
  (tests/salt/saltrender.py); cached for the session.
- ``trixie_root``: a Debian 13 chroot with Dovecot 2.4, OpenSMTPD 7.6, nginx and unbound,
  for what the host (Debian 12) has no validator for (tests/salt/chroots.py).
- ``test_cert``, ``fake_venv``: stand-ins validators open instead of the relay's files.

A module of its own name (not conftest.py), so test modules import its names without
``from conftest import``, which picks whichever conftest was imported last.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from chroots import CACHE_DIR, debian_chroot

REPO = Path(__file__).resolve().parents[2]
SALT_VENV = CACHE_DIR / "salt-venv"
#: The Salt every test renders with: the one scripts/deploy installs on a relay.
SALT_REQUIREMENT = re.search(
    r"^SALT_REQUIREMENT='([^']+)'$", (REPO / "scripts" / "deploy").read_text(), re.MULTILINE
).group(1)
SALT_RENDER = Path(__file__).with_name("saltrender.py")

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

#: Grains as Salt's grains/core.py reports them (config grains win over detected ones, so
#: this Debian host renders exactly what such a minion would).
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
#: OpenBSD 7.6 (osfinger is "<os>-<major>"); apart from PLATFORMS, which the Debian-family
#: render tests iterate over.
OPENBSD_GRAINS = {
    "os_family": "OpenBSD", "os": "OpenBSD", "osfinger": "OpenBSD-7", "osrelease": "7.6",
    "osmajorrelease": 7, "kernel": "OpenBSD", "oscodename": "",
}  # fmt: skip


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


class Rendered:
    """One compiled and rendered formula: the map, the states and the managed files."""

    def __init__(self, out: Path, index: dict):
        self.out = out
        self.map = index["map"]
        self.states = index["states"]
        self.files = index["files"]
        self.standalone = index.get("standalone", {})

    def path(self, name: str) -> Path:
        return Path(self.files[name]["rendered"])

    def text(self, name: str) -> str:
        return self.path(name).read_text()


def install_salt() -> Path:
    """Python of the test cache's Salt venv, holding :data:`SALT_REQUIREMENT`.

    Created on first use; a venv left with another Salt (an older pin) is brought to this
    one in place, under the same lock.
    """
    python = SALT_VENV / "bin" / "python"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".salt-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (SALT_VENV / "bin" / "salt-call").exists():
            shutil.rmtree(SALT_VENV, ignore_errors=True)
            result = run(["/usr/bin/python3", "-m", "venv", str(SALT_VENV)])
            assert result.returncode == 0, result.stderr
        check = (
            "import importlib.metadata as m, packaging.requirements as r;"
            f"exit(m.version('salt') not in r.Requirement({SALT_REQUIREMENT!r}).specifier)"
        )
        satisfied = run([str(python), "-c", check])
        if satisfied.returncode != 0:
            result = run([str(python), "-m", "pip", "install", "--quiet", SALT_REQUIREMENT])
            assert result.returncode == 0, result.stdout + result.stderr
    return python


def write_minion_config(root: Path, grains: dict, pillar: dict) -> Path:
    """A masterless minion config: file_roots = the formula + the checkout, like a relay."""
    config_dir = root / "config"
    pillar_dir = root / "pillar"
    extra_dir = root / "extra"
    for d in (config_dir, pillar_dir, extra_dir):
        d.mkdir(parents=True, exist_ok=True)
    (pillar_dir / "top.sls").write_text("base:\n  '*':\n    - chatmail\n")
    (pillar_dir / "chatmail.sls").write_text(yaml.safe_dump(pillar))
    config = {
        "file_client": "local",
        "root_dir": str(root / "salt-root"),
        "file_roots": {"base": [str(REPO / "salt"), str(REPO), str(extra_dir)]},
        "pillar_roots": {"base": [str(pillar_dir)]},
        "file_ignore_regex": [
            r"(^|/)\.venv(/|$)",
            r"(^|/)\.git(/|$)",
            r"(^|/)node_modules(/|$)",
            r"(^|/)__pycache__(/|$)",
            r"\.egg-info(/|$)",
        ],
        "log_level": "error",
        "grains": grains,
    }
    (config_dir / "minion").write_text(yaml.safe_dump(config))
    return config_dir


@pytest.fixture(scope="session")
def salt_python() -> Path:
    """Python of a venv with Salt installed; installs it on first use."""
    return install_salt()


@pytest.fixture(scope="session")
def trixie_root() -> Path:
    """Root of a Debian 13 chroot holding its validators (doveconf 2.4, smtpd 7.6, ...)."""
    return debian_chroot("trixie", TRIXIE_PACKAGES)


@pytest.fixture(scope="session")
def render(salt_python, tmp_path_factory):
    """``render(platform, name, pillar=None, grains=None) -> Rendered``.

    ``pillar`` defaults to ``PILLARS[name]()`` and ``grains`` to ``PLATFORMS[platform]``;
    ``name`` only names the work directory. Raises RenderError with Salt's message.
    """
    cache: dict[str, Rendered] = {}

    def do_render(
        platform: str,
        pillar_name: str,
        pillar: dict | None = None,
        grains: dict | None = None,
        standalone: tuple[str, ...] = (),
    ) -> Rendered:
        pillar = pillar if pillar is not None else PILLARS[pillar_name]()
        grains = grains or PLATFORMS[platform]
        key = json.dumps([pillar, grains, standalone], sort_keys=True)
        if key in cache:
            return cache[key]
        root = tmp_path_factory.mktemp(f"salt-{platform}-{pillar_name}")
        config_dir = write_minion_config(root, grains, pillar)
        out = root / "out"
        # Salt leaves temporary files (__salt.tmp.*) behind: in the work directory, not /tmp
        (root / "tmp").mkdir()
        result = run(
            [
                str(salt_python),
                str(SALT_RENDER),
                "--config-dir",
                str(config_dir),
                "--out",
                str(out),
                "--map-template-dir",
                str(root / "extra"),
                "--standalone",
                ",".join(standalone),
            ],
            timeout=300,
            env={**os.environ, "TMPDIR": str(root / "tmp")},
        )
        index_path = out / "index.json"
        if result.returncode != 0 or not index_path.exists():
            raise RenderError(result.stdout + result.stderr)
        index = json.loads(index_path.read_text())
        if index["errors"]:
            raise RenderError("\n".join(index["errors"]))
        cache[key] = Rendered(out, index)
        return cache[key]

    def prerender(combos: list[tuple[str, str]]) -> None:
        """Render several platform/pillar combinations two at a time (Salt's start-up
        dominates; two processes overlap well even on two cores)."""
        with ThreadPoolExecutor(max_workers=2) as pool:
            for future in [pool.submit(do_render, *c) for c in combos]:
                try:
                    future.result()
                except RenderError:
                    pass  # reported again by the test that renders this combination

    do_render.prerender = prerender
    return do_render


@pytest.fixture(scope="session")
def test_cert(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate and key standing in for the relay's TLS files."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    result = run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-noenc",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=test",
        ]
    )
    assert result.returncode == 0, result.stderr
    return cert, key


@pytest.fixture(scope="session")
def fake_venv(tmp_path_factory) -> Path:
    """A venv stand-in whose console scripts exist (systemd-analyze checks ExecStart)."""
    venv = tmp_path_factory.mktemp("venv")
    (venv / "bin").mkdir()
    for script in (
        "doveauth",
        "chatmail-metadata",
        "lastlogin",
        "filtermail",
        "chatmail-expire",
        "chatmail-quota-expire",
        "chatmail-api",
        "chatmail-www",
        "chatmail-accountstats",
        "python",
    ):
        path = venv / "bin" / script
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    return venv


os.environ.setdefault("LC_ALL", "C")
