"""What makes federation hard, between the lab's relays: bounces that must pass the strict
incoming rules, port 25 refusals with upstream's reply texts, a relay that is down and a
relay missing from DNS."""

from __future__ import annotations

import email
import email.policy
import time

import lab as labctl
import pytest
from fleetclient import (
    Account,
    dkim_key,
    dkim_signed,
    flush_queue,
    inbound_session,
    queued_for,
    smtp_from_relay,
)
from relayclient import encrypted_mail, message_id, plain_mail

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]


def spec(lab: labctl.Lab, minion_id: str) -> labctl.RelaySpec:
    return next(r for r in lab.relays if r.minion_id == minion_id)


def new_account(lab: labctl.Lab, minion_id: str) -> Account:
    account = Account(spec(lab, minion_id))
    with account.imap():
        pass
    return account


# --- bounces ------------------------------------------------------------------------------

#: (sender's relay, relay without the recipient, who writes the bounce): bounces of Postfix
#: with a lab-CA certificate and of the `_` Postfix relay, to OpenSMTPD and to Postfix.
#: OpenSMTPD refuses an unknown account at RCPT instead (its LMTP client would take
#: Dovecot's 550 for temporary, OpenSMTPD issue #1276): the sender's own MTA bounces.
BOUNCES = [
    ("relay2", "relay1", "destination"),
    ("relay2", "relay3", "destination"),
    ("relay1", "relay3", "destination"),
    ("relay1", "relay2", "source"),
]


@pytest.mark.parametrize(
    ("source", "destination", "bouncer"),
    BOUNCES,
    ids=["relay2->relay1", "relay2->relay3", "relay1->relay3", "relay1->relay2"],
)
def test_bounce_for_unknown_recipient_reaches_the_sender(
    dns_filled, source, destination, bouncer
):
    """A Postfix recipient relay accepts the mail, Dovecot refuses the unknown account, and
    the MTA's bounce (DKIM-signed by that relay) passes the sender relay's incoming checks:
    a delivery report from the null sender, in cleartext, with an aligned signature. An
    OpenSMTPD recipient relay refuses at RCPT, and the sender's MTA bounces at once with
    that reply."""
    sender = new_account(dns_filled, source)
    receiver = spec(dns_filled, destination)
    nobody = f"nobody{time.monotonic_ns() % 10**6}@{receiver.domain}"
    msgid = message_id(sender.relay.domain)
    sender.send([nobody], encrypted_mail(sender.addr, [nobody], msgid))
    (raw,) = sender.search("ALL", timeout=90)  # a fresh account: nothing else arrives
    bounce = email.message_from_bytes(raw, policy=email.policy.default)
    assert msgid.encode() in raw and nobody.encode() in raw
    assert bounce.get_content_type() == "multipart/report", bounce["Content-Type"]
    bouncing = receiver if bouncer == "destination" else sender.relay
    assert bounce["From"].addresses[0].addr_spec.lower() == f"mailer-daemon@{bouncing.domain}"
    if bouncer == "source":
        unfolded = b" ".join(raw.split())  # Postfix wraps the reply in its report
        assert f"550 Invalid recipient: <{nobody}>".encode() in unfolded
        assert b"in reply to RCPT TO command" in unfolded
        return
    # It came over port 25 from the recipient's relay (not made up by the sender's own MTA)
    received = inbound_session(
        dns_filled.relay(source), sender.relay.mta, "", sender.addr
    )
    assert any(receiver.address in line for line in received), received
    assert "DKIM-Signature" not in bounce  # verified, then stripped at delivery


# --- refusals on port 25 --------------------------------------------------------------------

#: (sending relay, receiving relay): into Postfix and into OpenSMTPD.
REFUSAL_PAIRS = [("relay2", "relay1"), ("relay1", "relay2")]


@pytest.fixture(scope="module", params=REFUSAL_PAIRS, ids=["->".join(p) for p in REFUSAL_PAIRS])
def port25(request, dns_filled):
    """A sender account's address on one relay, a recipient account on the other, and
    the DKIM keys to sign as the sending relay and as the `_` relay."""
    source, destination = request.param
    recipient = new_account(dns_filled, destination)
    return {
        "lab": dns_filled,
        "sender": spec(dns_filled, source),
        "receiver": spec(dns_filled, destination),
        "recipient": recipient,
        "from": f"alice@{spec(dns_filled, source).domain}",
        "key": dkim_key(dns_filled, spec(dns_filled, source)),
        "other": spec(dns_filled, "relay3"),
        "other_key": dkim_key(dns_filled, spec(dns_filled, "relay3")),
    }


def send25(p: dict, msg: bytes, starttls: bool = True, from_addr: str = "") -> dict:
    return smtp_from_relay(
        p["lab"], p["sender"], p["receiver"], from_addr or p["from"], p["recipient"].addr, msg,
        starttls=starttls,
    )


def test_port25_accepts_signed_encrypted_mail_and_strips_the_signature(port25):
    msgid = message_id(port25["sender"].domain)
    msg = encrypted_mail(port25["from"], [port25["recipient"].addr], msgid)
    reply = send25(port25, dkim_signed(msg, port25["sender"].domain, port25["key"]))
    assert (reply["stage"], reply["code"]) == ("data", 250), reply
    raw = port25["recipient"].wait_for(msgid)
    headers = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert b"dkim-signature:" not in headers and b"authentication-results:" not in headers


def test_port25_refuses_a_session_without_starttls(port25):
    msg = encrypted_mail(port25["from"], [port25["recipient"].addr], message_id("x.example"))
    reply = send25(port25, dkim_signed(msg, port25["sender"].domain, port25["key"]), False)
    assert reply["stage"] in ("mail", "rcpt") and reply["code"] == 530, reply
    assert "Must issue a STARTTLS command first" in reply["text"], reply


def refusal_cases(p: dict) -> dict[str, tuple[bytes, str]]:
    """name: (message as the sending relay puts it on the wire, from address)."""
    rcpt = p["recipient"].addr
    sender_domain = p["sender"].domain

    def encrypted(from_addr: str) -> bytes:
        return encrypted_mail(from_addr, [rcpt], message_id(sender_domain))

    signed = dkim_signed(encrypted(p["from"]), sender_domain, p["key"])
    forged = f"boss@{p['receiver'].domain}"
    return {
        "cleartext": (
            dkim_signed(plain_mail(p["from"], [rcpt], message_id(sender_domain)),
                        sender_domain, p["key"]),
            p["from"],
        ),
        "unsigned": (encrypted(p["from"]), p["from"]),
        "broken-signature": (signed.replace(b"Subject: ...", b"Subject: ..!"), p["from"]),
        "other-domain": (dkim_signed(encrypted(p["from"]), p["other"].domain, p["other_key"]),
                         p["from"]),
        "forged-from": (dkim_signed(encrypted(forged), sender_domain, p["key"]), forged),
    }


#: Upstream's replies (filtermail's texts; 554 5.7.1 as its OpenDKIM final.lua had them).
REFUSALS = {
    "cleartext": (523, "Encryption Needed: Invalid Unencrypted Mail"),
    "unsigned": (554, "5.7.1 No DKIM signature found"),
    "broken-signature": (554, "5.7.1 No valid DKIM signature found"),
    "other-domain": (554, "5.7.1 No valid DKIM signature found"),
    "forged-from": (554, "5.7.1 No valid DKIM signature found"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_port25_refuses_with_upstreams_reply(port25, case):
    msg, from_addr = refusal_cases(port25)[case]
    reply = send25(port25, msg, from_addr=from_addr)
    code, text = REFUSALS[case]
    assert (reply["stage"], reply["code"]) == ("data", code), reply
    assert reply["text"].strip() == text, reply


def test_port25_unknown_local_part(port25):
    """Postfix takes any local part at RCPT and bounces later; OpenSMTPD refuses an unknown
    account at RCPT (test_bounce_for_unknown_recipient_reaches_the_sender). Either way the
    sender learns it; only the moment differs."""
    nobody = f"nobody@{port25['receiver'].domain}"
    reply = smtp_from_relay(
        port25["lab"], port25["sender"], port25["receiver"], port25["from"], nobody, None
    )
    if port25["receiver"].mta == "opensmtpd":
        assert (reply["stage"], reply["code"]) == ("rcpt", 550), reply
        assert reply["text"].strip() == f"Invalid recipient: <{nobody}>", reply
    else:
        assert (reply["stage"], reply["code"]) == ("rcpt", 250), reply


# --- faults -------------------------------------------------------------------------------

DOWN = [("relay1", "relay2"), ("relay2", "relay1")]


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(f"{what} (after {timeout:.0f} s)")


def delivered_after_retries(sending, mta: str, recipient: Account, msgid: str) -> None:
    """The MTA's next retries, every few seconds rather than after its backoff (OpenSMTPD
    also keeps a failed route disabled for a while), until the message is there."""

    def retried() -> bool:
        flush_queue(sending, mta)
        time.sleep(3)
        return recipient.count(msgid) > 0

    wait_until(retried, 180, f"{msgid} did not reach {recipient.addr}")


@pytest.mark.parametrize(("source", "destination"), DOWN, ids=["->".join(d) for d in DOWN])
def test_mail_to_a_stopped_relay_waits_in_the_queue_and_arrives_once(
    dns_filled, source, destination
):
    sender, recipient = new_account(dns_filled, source), new_account(dns_filled, destination)
    down = dns_filled.relay(destination)
    sending = dns_filled.relay(source)
    msgid = message_id(sender.relay.domain)
    down.shutdown(timeout=30)
    try:
        sender.send([recipient.addr], encrypted_mail(sender.addr, [recipient.addr], msgid))
        wait_until(
            lambda: queued_for(sending, sender.relay.mta, recipient.addr),
            60,
            f"{source} queued nothing for {recipient.addr}",
        )
    finally:
        down.boot()
    for port in (25, 993):
        down.wait_for_port(port, host=recipient.relay.address, timeout=120)
    delivered_after_retries(sending, sender.relay.mta, recipient, msgid)
    wait_until(
        lambda: not queued_for(sending, sender.relay.mta, recipient.addr),
        60,
        f"{source} still queues mail for {recipient.addr}",
    )
    time.sleep(5)  # a second delivery of the same message would show by now
    assert recipient.count(msgid) == 1


@pytest.mark.parametrize(("source", "destination"), DOWN, ids=["->".join(d) for d in DOWN])
def test_mail_to_a_relay_missing_from_dns_is_deferred_not_bounced(
    dns_filled, source, destination
):
    """The lab DNS stops serving the recipient's zone (its resolvers answer SERVFAIL): the
    sender defers, and delivers once the zone is back."""
    sender, recipient = new_account(dns_filled, source), new_account(dns_filled, destination)
    sending = dns_filled.relay(source)
    zone = f"{labctl.NSD_ZONES}/{recipient.relay.domain}.zone"
    master = dns_filled.master
    msgid = message_id(sender.relay.domain)
    master.run(["mv", zone, f"{zone}.away"])
    try:
        master.run("systemctl restart nsd")
        # as if the records' TTL had run out
        sending.run(["unbound-control", "flush_zone", recipient.relay.domain])
        sender.send([recipient.addr], encrypted_mail(sender.addr, [recipient.addr], msgid))
        wait_until(
            lambda: queued_for(sending, sender.relay.mta, recipient.addr),
            60,
            f"{source} queued nothing for {recipient.addr}",
        )
        flush_queue(sending, sender.relay.mta)  # a retry while DNS still fails
        time.sleep(10)
        assert queued_for(sending, sender.relay.mta, recipient.addr), "dropped or bounced"
        with pytest.raises(TimeoutError):
            sender.search("BODY", msgid.strip("<>"), timeout=1)  # no bounce
    finally:
        master.run(["mv", f"{zone}.away", zone])
        master.run("systemctl restart nsd")
    sending.run(["unbound-control", "flush_zone", recipient.relay.domain])
    delivered_after_retries(sending, sender.relay.mta, recipient, msgid)
    assert recipient.count(msgid) == 1
