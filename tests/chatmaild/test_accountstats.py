"""chatmail-accountstats: the mailbox walk the control API's /metrics reads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from chatmaild.accountstats import main, read_stats
from chatmaild.config import EXIT_CONFIG


def test_writes_what_the_api_reads(make_config, tmp_path):
    config = make_config("chat.example.org")
    for name in ("a@chat.example.org", "ci-b@chat.example.org"):
        maildir = config.mailboxes_path / name / "cur"
        maildir.mkdir(parents=True)
        (maildir / "1.msg").write_bytes(b"x" * 100)
        (config.mailboxes_path / name / "password").write_text("{SHA512-CRYPT}x")
    out = tmp_path / "stats" / "stats.json"
    out.parent.mkdir()
    assert main([str(tmp_path / "chatmail.ini"), str(out)]) == 0
    stats = read_stats(out)
    assert stats.accounts == {"all": 2, "ci": 1, "user": 1}
    assert stats.storage["messages"] == 200


def test_unusable_ini_exits_like_every_console_script(tmp_path):
    script = Path(sys.executable).with_name("chatmail-accountstats")
    result = subprocess.run(
        [script, tmp_path / "missing.ini", tmp_path / "stats.json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == EXIT_CONFIG
    assert "cannot read" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "stats.json").exists()


def test_missing_or_garbled_stats_read_as_none(tmp_path):
    assert read_stats(tmp_path / "none.json") is None
    (tmp_path / "bad.json").write_text("{")
    assert read_stats(tmp_path / "bad.json") is None
