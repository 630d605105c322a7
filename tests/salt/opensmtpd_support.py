"""The Debian 13 chroots that check and run OpenSMTPD with the rendered configs: shared by
the OpenBSD and OpenSMTPD tests (rendering itself is saltsupport's ``render``).
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

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
