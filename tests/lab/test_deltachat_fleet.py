"""Real Delta Chat clients on different relays of the lab: verified contacts and groups
(securejoin), end-to-end encrypted messages both ways, read receipts.

The clients (deltachat-rpc-server) run in the lab's client namespace: they find their relay
through the lab DNS (without checking its certificate: Delta Chat trusts only its built-in
roots, see fleetclient.dclogin_qr), or, on the IP-address relay, by the address its /new
names; the relays carry the mail between them over port 25, with verified TLS where the
recipient relay has a name with a lab-CA certificate.
"""

from __future__ import annotations

import time

import pytest
from deltachat_rpc_client import EventType
from fleetclient import online_account, wait_for_text

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

#: Postfix (Debian 12) with OpenSMTPD (Debian 13), both with lab-CA certificates;
#: OpenSMTPD with the self-signed `_` relay (encryption without verification); a name
#: relay with the IP-address relay (accounts user@[198.18.0.14] from its /new).
PAIRS = [("relay1", "relay2"), ("relay2", "relay3"), ("relay1", "relay4")]


def wait_for_read(account, msg_id: int) -> None:
    while True:
        event = account.wait_for_event(EventType.MSG_READ)
        if event.msg_id == msg_id:
            return


@pytest.fixture(scope="module", params=PAIRS, ids=["<->".join(p) for p in PAIRS])
def joined(request, deltachat, client_netns):
    """Two profiles on two relays, the second joined the first by its QR code."""
    first, second = (
        next(r for r in client_netns.relays if r.minion_id == m) for m in request.param
    )
    ac1 = online_account(deltachat, first)
    ac2 = online_account(deltachat, second)
    started = time.monotonic()
    ac2.secure_join(ac1.get_qr_code())
    ac1.wait_for_securejoin_inviter_success()
    ac2.wait_for_securejoin_joiner_success()
    print(f"\nsecurejoin {first.minion_id} <- {second.minion_id}: "
          f"{time.monotonic() - started:.1f} s")
    return ac1, ac2


def test_securejoin_across_relays_gives_both_sides_the_others_key(joined):
    ac1, ac2 = joined
    for account, other in ((ac1, ac2), (ac2, ac1)):
        contact = account.get_contact_by_addr(other.addr).get_snapshot()
        assert contact.is_key_contact and contact.e2ee_avail, dict(contact)


def test_messages_cross_both_ways_with_padlock_and_read_receipts(joined):
    ac1, ac2 = joined
    chat12, chat21 = ac1.create_chat(ac2), ac2.create_chat(ac1)
    for sender, receiver, chat in ((ac1, ac2, chat12), (ac2, ac1, chat21)):
        text = f"hello from {sender.relay.minion_id}"
        sent = chat.send_text(text)
        got = wait_for_text(receiver, text)
        assert got.show_padlock, f"{sender.addr} -> {receiver.addr} arrived unencrypted"
        assert got.sender.get_snapshot().address == sender.addr
        # the receiver reads it: a read receipt (MDN) crosses back to the sender's relay
        receiver.mark_seen_messages([receiver.get_message_by_id(got.id)])
        wait_for_read(sender, sent.id)
        assert sent.get_read_receipt_count() == 1


def test_verified_group_across_relays(joined):
    ac1, ac2 = joined
    group = ac1.create_group("fleet")
    ac2.secure_join(group.get_qr_code())
    ac1.wait_for_securejoin_inviter_success()
    ac2.wait_for_securejoin_joiner_success()
    addresses = {c.get_snapshot().address for c in group.get_contacts()}
    assert ac2.addr in addresses, addresses
    group.send_text("to the group")
    got = wait_for_text(ac2, "to the group")
    assert got.show_padlock
    chat = ac2.get_chat_by_id(got.chat_id).get_basic_snapshot()
    assert chat.name == "fleet", chat
