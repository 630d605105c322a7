"""chatmail-selfcheck: the highstate's last state, decided from the probe's result."""

from __future__ import annotations

from datetime import UTC, datetime

from chatmail_api import selfcheck
from chatmail_api.models import ProbeResult


def _failing_probe(detail: str):
    def probe_once(settings, config):
        return ProbeResult(ok=False, started_at=datetime.now(UTC), duration_s=0.1, detail=detail)

    return probe_once


LOGIN_REFUSED = "submission 127.0.0.1:587: SMTPAuthenticationError: (535, b'5.7.8 Error: authentication failed')"


def test_a_refused_login_fails_while_accounts_may_be_created(api_settings, monkeypatch):
    settings, config = api_settings()
    monkeypatch.setattr(selfcheck, "probe_once", _failing_probe(LOGIN_REFUSED))
    ok, comment = selfcheck.selfcheck(settings, within=0)
    assert not ok and "SMTPAuthenticationError" in comment


def test_closed_account_creation_is_not_a_failed_apply(api_settings, monkeypatch):
    """With /etc/chatmail-nocreate (an adopted relay that had it, an operator who closed
    creation) the probe account cannot come into being: the apply says so, and passes."""
    settings, config = api_settings()
    config.nocreate_file.write_text("closed\n")
    monkeypatch.setattr(selfcheck, "probe_once", _failing_probe(LOGIN_REFUSED))
    ok, comment = selfcheck.selfcheck(settings, within=0)
    assert ok and "not proven" in comment and str(config.nocreate_file) in comment


def test_closed_creation_does_not_hide_other_failures(api_settings, monkeypatch):
    settings, config = api_settings()
    config.nocreate_file.write_text("closed\n")
    failure = "imaps 127.0.0.1:993: TimeoutError: message not in INBOX before the probe timeout"
    monkeypatch.setattr(selfcheck, "probe_once", _failing_probe(failure))
    ok, comment = selfcheck.selfcheck(settings, within=0)
    assert not ok and "TimeoutError" in comment


def test_closed_creation_is_decided_by_the_second_refusal_not_the_deadline(
    api_settings, monkeypatch
):
    settings, config = api_settings()
    config.nocreate_file.write_text("closed\n")
    calls = []
    refuse = _failing_probe(LOGIN_REFUSED)
    monkeypatch.setattr(selfcheck, "probe_once", lambda s, c: calls.append(1) or refuse(s, c))
    monkeypatch.setattr(selfcheck.time, "sleep", lambda seconds: None)
    ok, comment = selfcheck.selfcheck(settings, within=600)
    assert ok and "not proven" in comment and len(calls) == 2
