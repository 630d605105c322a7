"""The rendered Dovecot config reads gz-compressed mail files and stores new mail that way.

Upstream relays store every message gzip-compressed (zlib plugin, ``zlib_save = gz``), so
a relay taken over holds such files. Here the real imap binary (Debian 12's Dovecot 2.3 on
the host, Debian 13's 2.4 in its chroot) runs a pre-authenticated IMAP session over a
Maildir, with the compression settings taken from the formula's rendered dovecot.conf:
it must FETCH an upstream gz file intact and APPEND new mail as gz. (tests/e2e/
test_compress.py does the same through the whole relay.)
"""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from pathlib import Path

import pytest

NOBODY = 65534
MESSAGE = b"From: <a@chat.example.org>\nSubject: [...]\nMessage-ID: <gz@chat.example.org>\n\n"
MESSAGE += b"-----BEGIN PGP MESSAGE-----\n" + b"wcBMA5sgX1ZXYZ0123456789abcdef\n" * 200


def compression_settings(conf: str, syntax: str) -> str:
    """The rendered config's plugin and compression lines, nothing else."""
    if syntax == "2.3":
        plugins = re.search(r"^mail_plugins = .*$", conf, re.MULTILINE).group(0)
        saving = re.findall(r"^\s*(zlib_save(?:_level)? = .*)$", conf, re.MULTILINE)
        return plugins + "\nplugin {\n" + "\n".join(saving) + "\n}\n"
    plugins = re.search(r"^mail_plugins \{[^}]*\}", conf, re.MULTILINE).group(0)
    saving = re.findall(r"^((?:mail_compress_write_method|compress_\w+_level) = .*)$", conf, re.M)
    return plugins + "\n" + "\n".join(saving) + "\n"


def standalone_config(work: Path, inside: Path, settings: str, syntax: str) -> Path:
    # 2.4's imap reads USER and HOME (its standalone mode) only through import_environment
    header = (
        "dovecot_config_version = 2.4.0\ndovecot_storage_version = 2.4.0\n"
        "import_environment {\n  USER = %{env:USER}\n  HOME = %{env:HOME}\n}\n"
    )
    mail = f"mail_driver = maildir\nmail_path = {inside}/Maildir\n"
    if syntax == "2.3":
        header, mail = "", f"mail_location = maildir:{inside}/Maildir\n"
    conf = work / "dovecot.conf"
    conf.write_text(
        f"{header}base_dir = {inside}/run\nstate_dir = {inside}/run\nlog_path = /dev/stderr\n"
        f"protocols =\nssl = no\n{mail}{settings}"
    )
    return conf


def imap_session(root: Path, inside: Path, commands: list[str]) -> str:
    """A PREAUTH session of Dovecot's imap binary as nobody, chrooted to ``root``."""
    script = "".join(f"{tag} {command}\r\n" for tag, command in enumerate(commands, 1))
    result = subprocess.run(
        ["chroot", f"--userspec={NOBODY}:{NOBODY}", "--groups=", str(root),
         "env", "-i", "USER=u1", f"HOME={inside}", "PATH=/usr/bin:/bin",
         "/usr/lib/dovecot/imap", "-c", f"{inside}/dovecot.conf"],
        input=script.encode(), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, out + result.stderr.decode(errors="replace")
    return out


@pytest.fixture(params=["debian12", "debian13"])
def dovecot(request, render, tmp_path):
    """``(root, inside, work)``: a Maildir and the config, where that release's imap runs."""
    rendered = render(request.param, "example")
    syntax = rendered.map["dovecot"]["syntax"]
    root = Path("/") if syntax == "2.3" else request.getfixturevalue("trixie_root")
    inside = Path("/tmp") / f"chatmail-gz-{tmp_path.name}"
    work = root / inside.relative_to("/")
    work.mkdir(parents=True)
    for sub in ("cur", "new", "tmp"):
        (work / "Maildir" / sub).mkdir(parents=True)
    (work / "run").mkdir()
    settings = compression_settings(rendered.text("/etc/dovecot/dovecot.conf"), syntax)
    standalone_config(work, inside, settings, syntax)
    try:
        yield root, inside, work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def chown_tree(path: Path) -> None:
    for item in [path, *path.rglob("*")]:
        shutil.chown(item, NOBODY, NOBODY)


def test_upstream_gz_file_is_fetched_intact(dovecot):
    root, inside, work = dovecot
    crlf = MESSAGE.replace(b"\n", b"\r\n").decode()
    name = f"1700000000.M1P1.upstream,S={len(MESSAGE)},W={len(crlf)}:2,S"
    (work / "Maildir/cur" / name).write_bytes(gzip.compress(MESSAGE))
    chown_tree(work)
    out = imap_session(root, inside, ["SELECT INBOX", "FETCH 1 (RFC822.SIZE RFC822)", "LOGOUT"])
    assert f"RFC822.SIZE {len(crlf)} RFC822 {{{len(crlf)}}}\r\n{crlf})" in out, out[-2000:]
    assert "2 OK" in out


def test_new_mail_is_stored_gz(dovecot):
    root, inside, work = dovecot
    chown_tree(work)
    crlf = MESSAGE.replace(b"\n", b"\r\n").decode()
    out = imap_session(
        root,
        inside,
        [f"APPEND INBOX {{{len(crlf)}+}}\r\n{crlf}", "SELECT INBOX", "FETCH 1 RFC822", "LOGOUT"],
    )
    assert "1 OK" in out and f"{{{len(crlf)}}}\r\n{crlf})" in out, out[-2000:]
    (stored,) = [p for d in ("cur", "new") for p in (work / "Maildir" / d).iterdir()]
    assert stored.read_bytes()[:2] == b"\x1f\x8b", stored.read_bytes()[:60]
    assert gzip.decompress(stored.read_bytes()) == MESSAGE
    # S= is the uncompressed size (Dovecot's quota and chatmail-expire read it)
    assert f",S={len(MESSAGE)}" in stored.name
