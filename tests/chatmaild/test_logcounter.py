"""chatmail-logcounter: upstream's mtail counters from journal lines, exported by the API."""

from __future__ import annotations

import subprocess
import sys

from chatmaild.counters import read_counters

#: Lines as journalctl -o short-iso prints them on the relay (Debian 12).
JOURNAL = """\
2026-12-06T18:00:01+0000 relay dovecot[812]: lmtp(abcdefghi@_chatmail.test)<901><Xk2>: msgid=<a@b>: saved mail to INBOX
2026-12-06T18:00:02+0000 relay dovecot[812]: lmtp(abcdefghi@_chatmail.test)<902><Xk3>: msgid=<c@d>: saved mail to INBOX
2026-12-06T18:00:03+0000 relay dovecot[812]: lmtp(full12345@_chatmail.test)<903><Xk4>: Error: msgid=<e@f>: save failed to INBOX: Quota exceeded (mailbox for user is full)
2026-12-06T18:00:04+0000 relay opendkim[501]: 4BX7Q: DKIM-Signature field added (s=opendkim, d=_chatmail.test)
2026-12-06T18:00:05+0000 relay filtermail[600]: INFO chatmaild.policy: Incoming: Filtering mailer-daemon message from mailer-daemon@other.example
2026-12-06T18:00:06+0000 relay postfix/smtpd[700]: NOQUEUE: reject: RCPT from unknown[192.0.2.9]: 554 5.7.1 <x@y>: Relay access denied
2026-12-06T18:00:07+0000 relay postfix/submission/smtpd[701]: NOQUEUE: reject: RCPT from x[192.0.2.8]: 550 5.2.1 <a@b>: mailbox disabled
2026-12-06T18:00:08+0000 relay dovecot[812]: imap-login: Login: user=<abcdefghi@_chatmail.test>
2026-12-06T18:00:09+0000 relay hostile[1]: saved mail to INBOX but not at the end
"""


def test_counts_upstreams_patterns(example_config, ini_path):
    subprocess.run(
        [sys.executable, "-m", "chatmaild.logcounter", str(ini_path), "--stdin"],
        input=JOURNAL + "x" * 100_000 + "\n", text=True, check=True, timeout=30,
    )  # fmt: skip
    totals = {k: v[()] for k, v in read_counters(example_config.counters_dir).items()}
    assert totals == {
        "delivered_mail_total": 2,
        "quota_exceeded_total": 1,
        "dkim_signed_total": 1,
        "mailer_daemon_mail_total": 1,
        "postfix_noqueue_total": 2,
    }


def test_reads_from_its_cursor_and_starts_at_the_end(tmp_path, monkeypatch):
    """The first read starts at the journal's end; later reads continue from the cursor
    that journalctl keeps, so a restart neither recounts nor skips lines."""
    from chatmaild.counters import Counters
    from chatmaild.logcounter import read_new_entries

    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "journalctl"
    fake.parent.mkdir()
    # A stand-in for journalctl's --cursor-file contract: it prints what follows the cursor
    # and writes the new cursor.
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {calls}\n'
        'for a in "$@"; do case "$a" in --cursor-file=*) c="${a#--cursor-file=}";; esac; done\n'
        'case " $* " in *" --lines=0 "*) ;; *) echo "h dovecot[1]: lmtp(a@b): saved mail to INBOX";; esac\n'
        'echo "s=1" > "$c"\n'
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    counters = Counters(None, "logcounter")
    cursor = tmp_path / "logcounter.cursor"
    assert read_new_entries(cursor, counters)
    assert counters.value("delivered_mail_total") == 0
    assert read_new_entries(cursor, counters)
    assert counters.value("delivered_mail_total") == 1
    first, second = calls.read_text().splitlines()
    assert "--lines=0" in first.split() and "--lines=0" not in second.split()
    assert f"--cursor-file={cursor}" in second.split()
