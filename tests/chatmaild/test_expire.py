"""chatmail-expire and chatmail-quota-expire on synthetic mailbox trees (mtimes via utime)."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatmaild.expire import (
    MessageFile,
    daily_expire_main,
    parse_dovecot_filename,
    quota_expire_main,
    select_for_quota,
)

DAY = 86400
NOW = time.time()
SUMMARY_RE = re.compile(
    r"^Removed (\d+) out of (\d+) mailboxes and (\d+) out of (\d+) files in [\d.]+ seconds"
)
_counter = itertools.count()


def set_age(path: Path, days: float) -> Path:
    ts = NOW - days * DAY
    os.utime(path, (ts, ts), follow_symlinks=False)
    return path


def make_mailbox(mailboxes: Path, addr: str, login_days: float | None = 0) -> Path:
    maildir = mailboxes / addr
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    if login_days is not None:
        (maildir / "password").write_text("$6$hash")
        set_age(maildir / "password", login_days)
    (maildir / "maildirsize").write_text("1000S\n")
    return maildir


def make_message(
    maildir: Path, sub: str = "cur", days: float = 0, size: int = 100, quota_size=None
) -> Path:
    ts = int(NOW - days * DAY)
    quota_size = size if quota_size is None else quota_size
    name = f"{ts}.M{next(_counter)}P7.host,S={quota_size},W={quota_size + 10}:2,S"
    path = maildir / sub / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return set_age(path, days)


@pytest.fixture
def setup(make_config, ini_path):
    """``config, ini`` with default expiry settings (20 d mail, 7 d large, 90 d inactive)."""

    def make(**overrides):
        config = make_config("chat.example.org", **overrides)
        return config, str(ini_path)

    return make


def run_daily(ini: str, *args: str, capsys) -> tuple[int, int, int, int]:
    assert daily_expire_main([ini, *args]) == 0
    out = capsys.readouterr().out.strip()
    match = SUMMARY_RE.match(out)
    assert match, out
    return tuple(int(x) for x in match.groups())


# -- pure parts ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("1700000000.M1P2.host,S=1234,W=1260:2,S", (1700000000, 1234)),
        ("1700000000.M1P2.host,S=1234:2,", (1700000000, 1234)),
        ("1700000000.M1P2.host,S=1234", (1700000000, 1234)),
        ("1700000000.M1P2.host:2,S", None),
        ("notanumber.M1P2.host,S=12:2,S", None),
        ("maildirsize", None),
        ("1700000000.M1P2.host:2,S=99", None),  # S in the flags part is not a size
        ("\u00b2\u00b3.M1P2.host,S=12:2,S", None),  # "²".isdigit() is True, int("²") fails
    ],
    ids=[
        "full",
        "no-W",
        "no-flags",
        "no-size",
        "bad-stamp",
        "foreign",
        "flags-only",
        "unicode-digits",
    ],
)
def test_parse_dovecot_filename(name, expected):
    assert parse_dovecot_filename(name) == expected


def _msg(label: str, days: float, size: int) -> MessageFile:
    ts = int(NOW - days * DAY)
    return MessageFile(Path(f"/m/cur/{ts}.{label}.host,S={size}:2,"), ts, 1)


def _labels(files: list[MessageFile]) -> list[str]:
    return [f.path.name.split(".")[1] for f in files]


def test_select_for_quota_oldest_first_by_dovecot_size_and_spares_recent():
    files = [_msg("a", 5, 400), _msg("b", 10, 300), _msg("c", 3, 200), _msg("d", 0.5, 900)]
    # total 1800 by S= (disk sizes are all 1 byte)
    assert _labels(select_for_quota(files, 1500, NOW)) == ["b"]
    assert _labels(select_for_quota(files, 1000, NOW)) == ["b", "a", "c"]
    # only "d" (12 h old) is left, and it is protected although still over target
    assert _labels(select_for_quota(files, 0, NOW)) == ["b", "a", "c"]
    assert select_for_quota(files, 1800, NOW) == []


# -- daily expiry --------------------------------------------------------------------


def test_dry_run_removes_nothing_and_remove_removes(setup, capsys):
    config, ini = setup()
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    old = make_message(maildir, "cur", days=21)
    fresh = make_message(maildir, "cur", days=19)
    assert run_daily(ini, capsys=capsys) == (0, 1, 1, 2)
    assert old.exists() and (maildir / "maildirsize").exists()
    assert run_daily(ini, "--remove", capsys=capsys) == (0, 1, 1, 2)
    assert not old.exists() and fresh.exists()
    assert not (maildir / "maildirsize").exists()


def test_dry_run_says_so(setup, capsys):
    _, ini = setup()
    assert daily_expire_main([ini]) == 0
    assert "dry run" in capsys.readouterr().out
    assert daily_expire_main([ini, "--remove"]) == 0
    assert "dry run" not in capsys.readouterr().out


def test_old_mail_in_every_maildir_folder_is_removed(setup, capsys):
    config, ini = setup()
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    old = [
        make_message(maildir, "cur", days=30),
        make_message(maildir, "new", days=30),
        make_message(maildir, "tmp", days=30),
        make_message(maildir, ".DeltaChat/cur", days=30),
        make_message(maildir, ".DeltaChat/new", days=21),
    ]
    kept = [
        make_message(maildir, ".DeltaChat/cur", days=1),
        make_message(maildir, "new", days=0),
    ]
    index = maildir / "dovecot.index"
    index.write_bytes(b"i")
    set_age(index, 100)  # not a message: never expired
    assert run_daily(ini, "--remove", capsys=capsys) == (0, 1, 5, 7)
    assert not any(p.exists() for p in old)
    assert all(p.exists() for p in kept) and index.exists()
    assert (maildir / "password").exists()


@pytest.mark.parametrize(
    ("sub", "size", "days", "removed"),
    [
        ("cur", 200_001, 8, True),
        ("cur", 200_000, 8, False),  # exactly at the limit is not large
        ("cur", 200_001, 6, False),  # large but young
        ("new", 200_001, 8, False),  # not yet seen by a client
        (".DeltaChat/cur", 300_000, 8, True),
    ],
    ids=["large-old", "limit", "large-young", "large-in-new", "large-in-subfolder"],
)
def test_large_mail(setup, capsys, sub, size, days, removed):
    config, ini = setup()
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    message = make_message(maildir, sub, days=days, size=size)
    run_daily(ini, "--remove", capsys=capsys)
    assert message.exists() is not removed
    assert (maildir / "maildirsize").exists() is not removed


def test_settings_come_from_the_ini(setup, capsys):
    config, ini = setup(delete_mails_after=3, delete_large_after=1)
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    old = make_message(maildir, "cur", days=4)
    large = make_message(maildir, "cur", days=2, size=250_000)
    fresh = make_message(maildir, "cur", days=2)
    run_daily(ini, "--remove", capsys=capsys)
    assert not old.exists() and not large.exists() and fresh.exists()


def test_inactive_mailboxes_are_removed(setup, capsys):
    config, ini = setup()
    mailboxes = config.mailboxes_path
    stale = [
        make_mailbox(mailboxes, f"stale{i}@chat.example.org", login_days=91) for i in range(150)
    ]
    for maildir in stale[:3]:
        make_message(maildir, "cur", days=1)
    fresh = [make_mailbox(mailboxes, f"fresh{i}@chat.example.org", login_days=89) for i in range(5)]
    assert run_daily(ini, "--remove", capsys=capsys) == (150, 155, 3, 3)
    assert sorted(mailboxes.iterdir()) == sorted(fresh)


def test_days_option_pretends_a_later_date(setup, capsys):
    config, ini = setup()
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org", login_days=80)
    message = make_message(maildir, "cur", days=15)
    assert run_daily(ini, "--days", "6", capsys=capsys) == (0, 1, 1, 1)
    assert run_daily(ini, "--days", "11", capsys=capsys) == (1, 1, 1, 1)
    assert message.exists()  # both were dry runs


def test_maxnum_limits_the_mailboxes_looked_at(setup, capsys):
    config, ini = setup()
    for i in range(5):
        make_mailbox(config.mailboxes_path, f"u{i}@chat.example.org", login_days=100)
    assert run_daily(ini, "--remove", "--maxnum", "2", capsys=capsys) == (2, 2, 0, 0)
    assert len(list(config.mailboxes_path.iterdir())) == 3


def test_mailbox_without_password(setup, capsys, caplog):
    config, ini = setup()
    mailboxes = config.mailboxes_path
    empty_old = set_age(_mkdir(mailboxes / "empty-old@chat.example.org"), 2)
    empty_new = _mkdir(mailboxes / "empty-new@chat.example.org")
    full = make_mailbox(mailboxes, "full@chat.example.org", login_days=None)
    old = make_message(full, "cur", days=30)
    young = make_message(full, "cur", days=1)
    assert run_daily(ini, "--remove", capsys=capsys) == (1, 3, 1, 2)
    assert not empty_old.exists()
    assert empty_new.exists()  # may be an account being created right now
    assert "Skipped deleting" in caplog.text and "full@chat.example.org" in caplog.text
    assert not old.exists() and young.exists()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_only_mailbox_directories_are_considered(setup, capsys):
    config, ini = setup()
    mailboxes = config.mailboxes_path
    queue = _mkdir(mailboxes / "pending_notifications")
    item = queue / "abc"
    item.write_text("a@b\n1\ntok")
    set_age(item, 100)
    stray = mailboxes / "file@chat.example.org"
    stray.write_text("not a dir")
    set_age(stray, 100)
    assert run_daily(ini, "--remove", capsys=capsys) == (0, 0, 0, 0)
    assert item.exists() and stray.exists()


def test_symlinks_are_never_followed(setup, capsys, tmp_path):
    config, ini = setup(max_mailbox_size="1M")  # so quota trimming would bite, too
    mailboxes = config.mailboxes_path
    outside = _mkdir(tmp_path / "outside")
    victims = []
    for sub in ("cur", "new"):
        victims.append(make_message(outside / "box", sub, days=100, size=300_000))
    victim_file = make_message(outside, "cur", days=100)
    # a mailbox that is a symlink to a directory outside the tree
    (mailboxes / "link@chat.example.org").symlink_to(outside / "box")
    # a maildir folder that is a symlink, and a message file that is a symlink
    maildir = make_mailbox(mailboxes, "a@chat.example.org")
    (maildir / ".Evil").symlink_to(outside / "box")
    (maildir / "cur" / "1.M1.host,S=999999:2,").symlink_to(victim_file)
    set_age(maildir / "cur" / "1.M1.host,S=999999:2,", 100)
    # an inactive mailbox with a symlink inside: rmtree removes the link, not the target
    gone = make_mailbox(mailboxes, "gone@chat.example.org", login_days=100)
    (gone / "cur" / "link").symlink_to(outside / "box" / "cur")
    run_daily(ini, "--remove", capsys=capsys)
    assert not gone.exists()
    assert all(v.exists() for v in victims) and victim_file.exists()
    assert (maildir / "cur" / "1.M1.host,S=999999:2,").is_symlink()
    assert (mailboxes / "link@chat.example.org").is_symlink()


def test_quota_trim_to_70_percent(setup, capsys):
    config, ini = setup(max_mailbox_size="1M")
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    target = int(1024 * 1024 * 0.7)
    # Sizes come from S= (the files on disk are tiny): 12 x 100 000 = 1 200 000 bytes.
    old = [
        make_message(maildir, "cur", days=10 - i * 0.5, size=10, quota_size=100_000)
        for i in range(8)
    ]
    recent = [make_message(maildir, "new", days=0.5, size=10, quota_size=100_000) for _ in range(4)]
    # removing the 5 oldest leaves 700 000 <= 734 003
    assert run_daily(ini, "--remove", capsys=capsys) == (0, 1, 5, 12)
    assert [p.exists() for p in old] == [False] * 5 + [True] * 3
    assert all(p.exists() for p in recent)
    assert 7 * 100_000 <= target
    assert not (maildir / "maildirsize").exists()


def test_quota_trim_never_touches_recent_mail(setup, capsys):
    config, ini = setup(max_mailbox_size="1M")
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    recent = [make_message(maildir, "cur", days=0.9, size=10, quota_size=300_000) for _ in range(5)]
    assert run_daily(ini, "--remove", capsys=capsys) == (0, 1, 0, 5)
    assert all(p.exists() for p in recent)
    assert (maildir / "maildirsize").exists()


def test_quota_trim_in_dry_run_accounts_for_expired_mail(setup, capsys):
    config, ini = setup(max_mailbox_size="1M")
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    make_message(maildir, "cur", days=25, size=10, quota_size=500_000)  # expires by age
    make_message(maildir, "cur", days=5, size=10, quota_size=500_000)
    # after the age rule only 500 000 bytes remain: no quota trim, in both modes
    assert run_daily(ini, capsys=capsys) == (0, 1, 1, 2)
    assert run_daily(ini, "--remove", capsys=capsys) == (0, 1, 1, 2)


def test_missing_mailboxes_dir_and_bad_ini(make_config, ini_path, tmp_path):
    make_config("chat.example.org", mailboxes_dir=tmp_path / "nope")
    assert daily_expire_main([str(ini_path)]) == 1
    bad = tmp_path / "bad.ini"
    bad.write_text("no section\n")
    assert daily_expire_main([str(bad)]) == 2


def test_console_script(setup):
    config, ini = setup()
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    old = make_message(maildir, "cur", days=30)
    exe = Path(sys.executable).parent / "chatmail-expire"
    proc = subprocess.run(
        [str(exe), ini, "-v", "--remove"], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert SUMMARY_RE.match(proc.stdout)
    assert f"removed {old}" in proc.stderr
    assert not old.exists()


# -- quota expire ----------------------------------------------------------------------


def test_quota_expire_main(setup, capsys):
    config, ini = setup()
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    old = [
        make_message(maildir, "cur", days=3 - i * 0.1, size=10, quota_size=400_000)
        for i in range(3)
    ]
    young = make_message(maildir, "new", days=0.1, size=10, quota_size=400_000)
    sub = make_message(maildir, ".DeltaChat/cur", days=5, size=10, quota_size=400_000)
    # 1 600 000 bytes at the top level; 1 MiB target -> the two oldest go
    assert quota_expire_main(["1", str(maildir), "--ini", ini]) == 0
    assert capsys.readouterr().out == "quota-expire: removed 2 message(s) from a@chat.example.org\n"
    assert [p.exists() for p in old] == [False, False, True]
    assert young.exists() and sub.exists()
    assert not (maildir / "maildirsize").exists()


def test_quota_expire_under_target_removes_nothing(setup, capsys):
    config, ini = setup()
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    make_message(maildir, "cur", days=3, size=10, quota_size=400_000)
    assert quota_expire_main(["1", str(maildir), "--ini", ini]) == 0
    assert capsys.readouterr().out == "quota-expire: removed 0 message(s) from a@chat.example.org\n"
    assert (maildir / "maildirsize").exists()


def test_quota_expire_refuses_paths_outside_the_mailboxes(setup, tmp_path, capsys):
    config, ini = setup()
    outside = make_mailbox(tmp_path / "elsewhere", "a@chat.example.org")
    victim = make_message(outside, "cur", days=5, size=10, quota_size=10_000_000)
    (config.mailboxes_path / "link@chat.example.org").symlink_to(outside)
    for path in (
        outside,
        config.mailboxes_path / "link@chat.example.org",
        config.mailboxes_path / "missing@chat.example.org",
        config.mailboxes_path / "a@chat.example.org" / ".." / ".." / "elsewhere",
        config.mailboxes_path / "pending_notifications",
    ):
        assert quota_expire_main(["0", str(path), "--ini", ini]) == 2, path
    assert victim.exists()
    assert capsys.readouterr().out == ""


def test_quota_expire_console_script(setup):
    config, ini = setup()
    maildir = make_mailbox(config.mailboxes_path, "a@chat.example.org")
    make_message(maildir, "cur", days=3, size=10, quota_size=2_000_000)
    exe = Path(sys.executable).parent / "chatmail-quota-expire"
    proc = subprocess.run(
        [str(exe), "--ini", ini, "1", str(maildir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "quota-expire: removed 1 message(s) from a@chat.example.org\n"
