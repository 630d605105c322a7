"""A real Delta Chat client (deltachat-rpc-server) against the relay in the container."""

from __future__ import annotations

import pytest
from deltachat_rpc_client import DeltaChat
from relayclient import online_account, ping_pong, start_rpc

# The first test also waits for the session's container: a base rootfs build on a new
# machine (~2 min) and the first apply (~2 min).
pytestmark = [pytest.mark.container, pytest.mark.timeout(1500)]


@pytest.fixture
def deltachat(relay, tmp_path):
    rpc = start_rpc(tmp_path / "accounts")
    try:
        yield DeltaChat(rpc)
    finally:
        rpc.close()


def test_two_accounts_exchange_encrypted_messages(relay, deltachat):
    ac1 = online_account(deltachat, relay)
    ac2 = online_account(deltachat, relay)
    assert relay.account_exists(ac1.addr) and relay.account_exists(ac2.addr)

    # Contacts made from the other profile carry its key: the chat is end-to-end encrypted.
    chat21 = ac2.create_chat(ac1)
    chat12 = ac1.create_chat(ac2)
    chat12.send_text("hello over chatmail")
    msg = ac2.wait_for_incoming_msg().get_snapshot()
    assert msg.text == "hello over chatmail"
    assert msg.show_padlock, "message arrived without end-to-end encryption"
    assert msg.sender.get_snapshot().address == ac1.addr

    seconds = ping_pong(ac1, ac2, chat12, chat21, "roundtrip")
    print(f"\nDelta Chat ping-pong: {seconds * 1000:.0f} ms")
