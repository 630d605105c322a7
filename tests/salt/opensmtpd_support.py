"""Rendering the formula for an arbitrary platform, and the Debian 13 chroot that validates
OpenSMTPD (and Dovecot) configs: shared by the OpenBSD and OpenSMTPD tests.

Salt runs masterless from a venv under the test cache (``salt-call --local``), with the
platform's grains pinned in the minion config (config grains win over detected ones), so
a Debian host renders exactly what an OpenBSD minion would. Nothing is applied.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from filelock import FileLock

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("CHATMAIL_TEST_CACHE", "/var/cache/chatmail-test"))
SALT_VENV = CACHE_DIR / "salt-venv"
SALT_REQUIREMENT = "salt>=3008,<3009"

# What Salt's grains/core.py reports on the platforms (osfinger is "<os>-<major>" except
# on Ubuntu, where it carries the whole release).
GRAINS = {
    "OpenBSD-7": {
        "os": "OpenBSD",
        "os_family": "OpenBSD",
        "osfinger": "OpenBSD-7",
        "osrelease": "7.6",
        "osmajorrelease": 7,
        "kernel": "OpenBSD",
        "init": "unknown",
    },
    "Debian-13": {
        "os": "Debian",
        "os_family": "Debian",
        "osfinger": "Debian-13",
        "osrelease": "13",
        "osmajorrelease": 13,
        "kernel": "Linux",
        "init": "systemd",
    },
}

# Debian 13 packages whose programs check our configs. The same list as the salt
# helper's validator chroot, so one cached tarball serves both.
TRIXIE_VALIDATORS = [
    "dovecot-auth-lua",
    "dovecot-core",
    "dovecot-imapd",
    "dovecot-lmtpd",
    "libnginx-mod-stream",
    "nginx",
    "opensmtpd",
    "opensmtpd-filter-dkimsign",
    "unbound",
]
# A trixie root that can also run the relay's Python code (the account table) next to
# OpenSMTPD: Python 3.13 builds crypt-r, so a compiler comes along.
TRIXIE_RUNTIME = [
    "opensmtpd",
    "opensmtpd-filter-dkimsign",
    "opendoas",
    "python3",
    "python3-venv",
    "python3-dev",
    "gcc",
    "libc6-dev",
    "openssl",
    "ca-certificates",
]


def salt_call_path() -> Path:
    """``salt-call`` from the test cache's venv, created on first use."""
    salt_call = SALT_VENV / "bin" / "salt-call"
    if salt_call.exists():
        return salt_call
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE_DIR / ".salt-venv.lock")):
        if not salt_call.exists():
            subprocess.run([sys.executable, "-m", "venv", str(SALT_VENV)], check=True)
            subprocess.run(
                [str(SALT_VENV / "bin" / "pip"), "install", "-q", SALT_REQUIREMENT],
                check=True,
            )
    return salt_call


class Renderer:
    """``salt-call --local`` for one platform and pillar, confined to ``workdir``."""

    def __init__(self, workdir: Path, platform: str, pillar: dict):
        self.workdir = workdir
        self.platform = platform
        config = workdir / "etc"
        pillar_root = workdir / "pillar"
        for path in (config, pillar_root, workdir / "cache", workdir / "run"):
            path.mkdir(parents=True, exist_ok=True)
        minion = {
            "id": f"render-{platform.lower()}",
            "file_client": "local",
            "file_roots": {"base": [str(REPO / "salt"), str(REPO)]},
            "pillar_roots": {"base": [str(pillar_root)]},
            "cachedir": str(workdir / "cache"),
            "pki_dir": str(workdir / "pki"),
            "sock_dir": str(workdir / "run"),
            "pidfile": str(workdir / "run" / "minion.pid"),
            "log_file": str(workdir / "minion.log"),
            "grains": GRAINS[platform],
            "grains_cache": False,
        }
        # JSON is YAML.
        (config / "minion").write_text(json.dumps(minion, indent=2))
        (pillar_root / "top.sls").write_text(json.dumps({"base": {"*": ["chatmail"]}}))
        (pillar_root / "chatmail.sls").write_text(json.dumps(pillar, indent=2))
        self.config = config

    def call(self, *args: str) -> subprocess.CompletedProcess:
        cmd = [
            str(salt_call_path()),
            "--local",
            "--config-dir",
            str(self.config),
            "--log-level=error",
            "--out=json",
            *args,
        ]
        return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)

    def _local(self, *args: str):
        res = self.call(*args)
        try:
            return json.loads(res.stdout)["local"]
        except (ValueError, KeyError) as exc:
            raise AssertionError(
                f"salt-call {' '.join(args)} failed ({res.returncode}):\n"
                f"{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
            ) from exc

    def highstate(self, sls: str = "chatmail") -> dict:
        """The compiled states of ``sls`` (``state.show_sls``), keyed by state ID."""
        result = self._local("state.show_sls", sls)
        if not isinstance(result, dict):
            raise TypeError(f"{sls} does not compile for {self.platform}:\n{result}")
        return result

    def template(self, source: str) -> str:
        """A salt:// Jinja template rendered as a file.managed would render it."""
        result = self._local("slsutil.renderer", source, "default_renderer=jinja")
        if not isinstance(result, str):
            raise TypeError(f"{source} did not render to text: {result!r}")
        return result

    def map(self) -> dict:
        """The merged map, as the states see it."""
        source = self.workdir / "dump-map.jinja"
        source.write_text(
            '{%- from "chatmail/map.jinja" import chatmail with context %}{{ chatmail | json }}'
        )
        return json.loads(self._local("slsutil.renderer", str(source), "default_renderer=jinja"))


@contextlib.contextmanager
def overlay(lower: Path, work: Path):
    """A writable copy-on-write view of ``lower`` (a cached chroot) for one test."""
    upper, scratch, root = work / "upper", work / "overlay-work", work / "root"
    for d in (upper, scratch, root):
        d.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o",
         f"lowerdir={lower},upperdir={upper},workdir={scratch}", str(root)],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield root
    finally:
        unmount(root)


def unmount(root: Path, timeout: float = 15) -> None:
    """Unmount once the last process inside (a table or filter smtpd spawned) is gone."""
    deadline = time.monotonic() + timeout
    while subprocess.run(["umount", str(root)], check=False, capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            subprocess.run(["umount", "--lazy", str(root)], check=True)
            return
        time.sleep(0.3)


def smtpd_check(
    trixie_root: Path,
    work: Path,
    conf: str,
    cert_key: tuple[Path, Path],
    libexec: str = "/usr/libexec/opensmtpd",
) -> subprocess.CompletedProcess:
    """``smtpd -n`` (Debian 13's OpenSMTPD 7.6) on a rendered smtpd.conf.

    smtpd opens the certificate and key and looks for the table backend
    (``<libexec>/table-chatmail``) while parsing, so stand-ins go where the config points.
    Debian's smtpd only looks in its own libexec directory: an OpenBSD config (whose
    backend lives in /usr/local/libexec/smtpd) is checked with the stand-in there too.
    """  # fmt: skip
    cert_path = re.search(r'^pki "[^"]+" cert "([^"]+)"', conf, re.MULTILINE).group(1)
    key_path = re.search(r'^pki "[^"]+" key "([^"]+)"', conf, re.MULTILINE).group(1)
    with overlay(trixie_root, work) as root:
        for path, source in ((cert_path, cert_key[0]), (key_path, cert_key[1])):
            target = root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
        for directory in {libexec, "/usr/libexec/opensmtpd"}:
            stub = root / directory.lstrip("/") / "table-chatmail"
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\nexit 1\n")
            stub.chmod(0o755)
        (root / "tmp/smtpd.conf").write_text(conf)
        return subprocess.run(
            ["chroot", str(root), "smtpd", "-n", "-f", "/tmp/smtpd.conf"],
            check=False,
            capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )  # fmt: skip
