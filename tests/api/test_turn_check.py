"""The ``turn.stun`` check: coturn answers a STUN Binding request on loopback."""

from __future__ import annotations

import socket
import threading

import pytest
from api_support import MONITOR, checks_by_id
from chatmail_api.app import create_app
from chatmail_api.checks import is_stun_binding_success, stun_binding_request
from fastapi.testclient import TestClient

TXID = bytes(range(12))


def stun_responder(answer) -> tuple[int, threading.Event]:
    """A UDP server on loopback replying ``answer(request)`` to each datagram (None: silent)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def run():
        with server:
            while not stop.is_set():
                try:
                    data, peer = server.recvfrom(2048)
                except TimeoutError:
                    continue
                reply = answer(data)
                if reply is not None:
                    server.sendto(reply, peer)

    threading.Thread(target=run, daemon=True).start()
    return server.getsockname()[1], stop


def binding_success(request: bytes) -> bytes:
    # the request's header with the success type; an XOR-MAPPED-ADDRESS is not needed here
    return b"\x01\x01" + request[2:20]


def unused_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def turn_check(api_settings, port: int) -> dict:
    settings, config = api_settings(turn_port=port)
    with TestClient(create_app(settings, config)) as client:
        return checks_by_id(client.get("/status", headers=MONITOR).json())["turn.stun"]


def test_request_is_a_bare_binding_header():
    request = stun_binding_request(TXID)
    assert request == b"\x00\x01\x00\x00\x21\x12\xa4\x42" + TXID


@pytest.mark.parametrize(
    ("answer", "ok"),
    [
        (b"\x01\x01\x00\x00\x21\x12\xa4\x42" + TXID, True),
        (b"\x01\x01\x00\x00\x21\x12\xa4\x42" + bytes(12), False),
        (b"\x01\x11\x00\x00\x21\x12\xa4\x42" + TXID, False),
        (b"\x01\x01\x00\x00\x00\x00\x00\x00" + TXID, False),
        (b"\x01\x01", False),
    ],
    ids=["success", "other-transaction", "error-response", "no-cookie", "short"],
)
def test_binding_success_is_recognised(answer, ok):
    assert is_stun_binding_success(answer, TXID) is ok


def test_answering_server_is_ok(api_settings):
    port, stop = stun_responder(binding_success)
    try:
        check = turn_check(api_settings, port)
    finally:
        stop.set()
    assert (check["state"], check["severity"]) == ("ok", "warning"), check


def test_nothing_listening_fails_with_a_hint(api_settings):
    check = turn_check(api_settings, unused_udp_port())
    assert check["state"] == "fail", check
    assert "coturn" in check["hint"]


def test_silent_server_fails_after_retries(api_settings):
    requests = []
    port, stop = stun_responder(lambda data: requests.append(data))
    try:
        check = turn_check(api_settings, port)
    finally:
        stop.set()
    assert check["state"] == "fail" and "no STUN answer" in check["summary"], check
    assert len(requests) == 3


def test_garbage_answer_fails(api_settings):
    port, stop = stun_responder(lambda data: b"HTTP/1.1 400 Bad Request\r\n\r\n")
    try:
        check = turn_check(api_settings, port)
    finally:
        stop.set()
    assert check["state"] == "fail" and "not a STUN Binding success" in check["summary"], check


def test_no_turn_port_no_check(api_settings):
    settings, config = api_settings()
    with TestClient(create_app(settings, config)) as client:
        assert "turn.stun" not in checks_by_id(client.get("/status", headers=MONITOR).json())
