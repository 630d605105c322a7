"""Queue listings of both MTAs parsed into the same entries (the real commands run in
tests/e2e/test_operator.py)."""

from __future__ import annotations

import json

import pytest

from chatmaild.mailqueue import delete_message, parse_postqueue, parse_smtpctl

POSTQUEUE = "\n".join(
    json.dumps(m)
    for m in [
        {
            "queue_name": "deferred",
            "queue_id": "4BX7Qr2yD1z9sKw",
            "arrival_time": 1700000000,
            "message_size": 4321,
            "sender": "a@chat.example.org",
            "recipients": [
                {"address": "x@Unreachable.example", "delay_reason": "connect timed out"},
                {"address": "y@other.example"},
            ],
        },
        {"queue_name": "active", "queue_id": "ABCDEF12", "arrival_time": 1700000100,
         "message_size": 10, "sender": "", "recipients": [{"address": "z@a.example"}]},
    ]
)  # fmt: skip

SMTPCTL = (
    "1a2b3c4d5e6f7a8b|inet4|mta|bounce|a@chat.example.org|x@unreachable.example|"
    "x@unreachable.example|1700000000|1700172800|1700000300|3|pending|"
    "Network error on destination MX|with a bar\n"
    "1a2b3c4d00000001|inet4|mta||a@chat.example.org|y@other.example|y@other.example|"
    "1700000000|1700172800|0|0|pending|\n"
)


def test_postqueue():
    first, second = parse_postqueue(POSTQUEUE)
    assert first.as_dict() == {
        "id": "4BX7Qr2yD1z9sKw",
        "arrival": 1700000000,
        "size": 4321,
        "recipient_domains": ["other.example", "unreachable.example"],
        "last_error": "connect timed out",
    }
    assert second.last_error is None and second.recipient_domains == ["a.example"]


def test_smtpctl_groups_envelopes_by_message():
    (entry,) = parse_smtpctl(SMTPCTL)
    assert entry.as_dict() == {
        "id": "1a2b3c4d",
        "arrival": 1700000000,
        "size": None,
        "recipient_domains": ["other.example", "unreachable.example"],
        "last_error": "Network error on destination MX|with a bar",
    }


@pytest.mark.parametrize("bad", ["", "abc", "../../x", "a" * 33, "abc-def1", "id\nx"])
def test_delete_refuses_ids_that_are_no_queue_ids(bad):
    with pytest.raises(ValueError):
        delete_message("postfix", bad)
