"""Debian chroots holding another release's validators (Debian 13's doveconf, smtpd, ...).

Built once with ``debootstrap --variant=minbase`` and cached as a tarball under
``/var/cache/chatmail-test/``; every later session unpacks the tarball (a few seconds) or
reuses the unpacked tree when it matches the tarball. The package set is part of the cache
name, so asking for other packages builds a separate chroot.

Daemons never start inside: a ``policy-rc.d`` that exits 101 is installed before any
package, and nothing is mounted into the chroot (validators only parse files).

Usable from pytest (``debian_chroot("trixie", [...])``) and as a script for a manual build:
``python tests/salt/chroots.py trixie dovecot-core opensmtpd``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE_DIR = Path(os.environ.get("CHATMAIL_TEST_CACHE", "/var/cache/chatmail-test"))
MIRROR = os.environ.get("CHATMAIL_DEBIAN_MIRROR", "http://deb.debian.org/debian")


def _cache_name(suite: str, packages: list[str]) -> str:
    digest = hashlib.sha256(" ".join(sorted(packages)).encode()).hexdigest()[:10]
    return f"{suite}-validators-{digest}"


def _run(cmd: list[str], **kwargs) -> None:
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n"
            f"{result.stderr[-3000:]}"
        )


def _build(suite: str, packages: list[str], root: Path) -> None:
    _run(["debootstrap", "--variant=minbase", suite, str(root), MIRROR])
    policy = root / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    env = {
        "DEBIAN_FRONTEND": "noninteractive",
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        "LC_ALL": "C",
    }
    _run(["chroot", str(root), "apt-get", "update", "-q"], env=env)
    _run(
        [
            "chroot",
            str(root),
            "apt-get",
            "install",
            "-y",
            "-q",
            "--no-install-recommends",
            *packages,
        ],
        env=env,
    )
    _run(["chroot", str(root), "apt-get", "clean"], env=env)


def debian_chroot(suite: str, packages: list[str]) -> Path:
    """Return the root of an unpacked chroot of ``suite`` with ``packages`` installed."""
    name = _cache_name(suite, packages)
    tarball = CACHE_DIR / f"{name}.tar.gz"
    root = CACHE_DIR / name
    stamp = root / ".unpacked-from"
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    if not tarball.exists():
        with tempfile.TemporaryDirectory(dir=CACHE_DIR, prefix=f".build-{name}-") as tmp:
            build_root = Path(tmp) / "root"
            _build(suite, packages, build_root)
            partial = Path(tmp) / "chroot.tar.gz"
            _run(["tar", "-C", str(build_root), "--numeric-owner", "-czf", str(partial), "."])
            os.replace(partial, tarball)
    tar_id = f"{tarball.stat().st_size}:{tarball.stat().st_mtime_ns}"
    if not (stamp.exists() and stamp.read_text() == tar_id):
        shutil.rmtree(root, ignore_errors=True)
        unpacking = CACHE_DIR / f".unpack-{name}"
        shutil.rmtree(unpacking, ignore_errors=True)
        unpacking.mkdir()
        _run(["tar", "-C", str(unpacking), "--numeric-owner", "-xzf", str(tarball)])
        (unpacking / ".unpacked-from").write_text(tar_id)
        os.replace(unpacking, root)
    return root


def run_in_chroot(root: Path, cmd: list[str], files: dict[str, str | bytes] | None = None):
    """Copy ``files`` ({path inside the chroot: content}) in, run ``cmd``, return the result.

    The files go below ``/tmp/chatmail-check-<random>/`` unless given as absolute paths
    outside /tmp; callers pass paths they own.
    """
    for path, content in (files or {}).items():
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            target.write_text(content)
        else:
            target.write_bytes(content)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    return subprocess.run(
        ["chroot", str(root), *cmd], check=False, capture_output=True, text=True, env=env
    )


if __name__ == "__main__":
    print(debian_chroot(sys.argv[1], sys.argv[2:]))
