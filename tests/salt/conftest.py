"""Fixtures for the Salt formula's render tests.

- ``salt_python``: Salt in its own venv under /var/cache/chatmail-test/salt-venv
  (``pip install salt`` once, ~70 s; Salt is no dependency of the project venv).
- ``trixie_root``: a Debian 13 chroot with Dovecot 2.4, OpenSMTPD 7.6, nginx and unbound,
  for validating what the host (Debian 12) has no validator for. Built once with
  debootstrap and cached as a tarball (tests/salt/chroots.py).
- ``render``: compiles the formula for a platform's grains and a pillar and renders every
  managed file (tests/salt/saltrender.py); results are cached for the session.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from chroots import CACHE_DIR, debian_chroot
from saltsupport import (  # noqa: F401 - re-exported for tests/api/test_salt_state.py
    PILLARS,
    PLATFORMS,
    REPO,
    SALT_MIN_MAJOR,
    SALT_VENV,
    TRIXIE_PACKAGES,
    RenderError,
    _example_pillar,
    run,
)


@pytest.fixture(scope="session")
def salt_python() -> Path:
    """Python of a venv with Salt installed; installs it on first use."""
    python = SALT_VENV / "bin" / "python"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".salt-venv.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (SALT_VENV / "bin" / "salt-call").exists():
            shutil.rmtree(SALT_VENV, ignore_errors=True)
            result = run(["/usr/bin/python3", "-m", "venv", str(SALT_VENV)])
            assert result.returncode == 0, result.stderr
            result = run([str(python), "-m", "pip", "install", "--quiet", "salt>=3008,<3009"])
            assert result.returncode == 0, result.stdout + result.stderr
    version = run([str(SALT_VENV / "bin" / "salt-call"), "--version"])
    assert version.returncode == 0, version.stderr
    major = int(version.stdout.split()[1].split(".")[0])
    assert major >= SALT_MIN_MAJOR, f"Salt too old: {version.stdout}"
    return python


@pytest.fixture(scope="session")
def trixie_root() -> Path:
    """Root of a Debian 13 chroot holding its validators (doveconf 2.4, smtpd 7.6, ...)."""
    return debian_chroot("trixie", TRIXIE_PACKAGES)


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
def render(salt_python, tmp_path_factory):
    """``render(platform, pillar) -> Rendered``; raises RenderError with Salt's message."""
    cache: dict[tuple, Rendered] = {}

    def do_render(
        platform: str,
        pillar_name: str,
        pillar: dict | None = None,
        grains: dict | None = None,
        standalone: tuple[str, ...] = (),
    ) -> Rendered:
        key = (platform, pillar_name, standalone)
        if pillar is None and key in cache:
            return cache[key]
        root = tmp_path_factory.mktemp(f"salt-{platform}-{pillar_name}")
        config_dir = write_minion_config(
            root, grains or PLATFORMS[platform], pillar or PILLARS[pillar_name]()
        )
        out = root / "out"
        result = run(
            [
                str(salt_python),
                str(Path(__file__).parent / "saltrender.py"),
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
        )
        index_path = out / "index.json"
        if result.returncode != 0 or not index_path.exists():
            raise RenderError(result.stdout + result.stderr)
        index = json.loads(index_path.read_text())
        if index["errors"]:
            raise RenderError("\n".join(index["errors"]))
        rendered = Rendered(out, index)
        if pillar is None:
            cache[key] = rendered
        return rendered

    def prerender(combos: list[tuple[str, str]]) -> None:
        """Render several platform/pillar combinations two at a time (Salt's start-up
        dominates; two processes overlap well even on two cores)."""
        from concurrent.futures import ThreadPoolExecutor

        todo = [c for c in combos if (c[0], c[1], ()) not in cache]
        with ThreadPoolExecutor(max_workers=2) as pool:
            for future in [pool.submit(do_render, *c) for c in todo]:
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
