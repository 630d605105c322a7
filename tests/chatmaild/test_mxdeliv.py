"""POST /mxdeliv (chatmaild.mxdeliv) and the HTTPS-first transport (chatmaild.mxtransport)
over real sockets: http.client and the transport's own client -> the listener (TLS for the
transport, as nginx would terminate it) -> a recording SMTP sink standing in for the MTA."""

from __future__ import annotations

import asyncio
import http.client
import smtplib
import socket
import ssl
import subprocess

import pytest
from filtermail_support import LoopThread, Sink, encrypted_mail, load_mail

from chatmaild import mxdeliv, mxtransport
from chatmaild.user import User

DOMAIN = "chat.example.org"
BOB = f"bob@{DOMAIN}"
CAROL = f"carol@{DOMAIN}"  # refuses cleartext
SENDER = "alice@other.example"


@pytest.fixture
def loop_thread():
    lt = LoopThread()
    yield lt
    lt.stop()


@pytest.fixture
def sink(loop_thread):
    sink = Sink(loop_thread)
    yield sink
    sink.stop()


def make_accounts(config, *addrs, enforce=()):
    for addr in addrs:
        user = User(config.mailboxes_path, addr)
        user.maildir.mkdir(parents=True, exist_ok=True)
        user.password_path.write_text("{SHA512-CRYPT}x")
        if addr in enforce:
            user.enforce_e2ee_path.touch()


@pytest.fixture
def listener(loop_thread, sink, make_config):
    """A /mxdeliv listener for DOMAIN (no DKIM checks unless asked), reinjecting into sink."""
    started = []

    def start(skip_dkim=True, **overrides):
        overrides.setdefault("postfix_reinject_port_incoming", sink.port)
        config = make_config(DOMAIN, **overrides)
        make_accounts(config, BOB, CAROL, enforce=(CAROL,))
        server, handler = loop_thread.run(mxdeliv.start_server(config, port=0, skip_dkim=skip_dkim))
        started.append((server, handler))
        return server.sockets[0].getsockname()[1]

    yield start
    for server, handler in started:
        loop_thread.run(_close(server, handler))


async def _close(server, handler):
    server.close()
    handler.close()


def post(port, body: bytes, mail_from=SENDER, rcpts=(BOB,), method="POST", path="/mxdeliv",
         headers=None):  # fmt: skip
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest(method, path)
    if mail_from is not None:
        conn.putheader("X-Mail-From", mail_from)
    for rcpt in rcpts:
        conn.putheader("X-Mail-To", rcpt)
    for name, value in (headers or {"Content-Length": str(len(body))}).items():
        conn.putheader(name, value)
    conn.endheaders()
    conn.send(body)
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    return response.status, text


# --- receiving ---------------------------------------------------------------------------


def test_accepted_message_is_reinjected_with_the_envelope_of_the_headers(listener, sink):
    port = listener()
    status, text = post(port, encrypted_mail(SENDER, BOB), rcpts=(BOB, f"carol+tag@{DOMAIN}"))
    assert (status, text) == (200, "250 2.0.0 Ok: queued as 4ABCDEF\r\n")
    [received] = sink.received
    assert received.mail_from == SENDER
    assert received.rcpt_tos == [BOB, f"carol+tag@{DOMAIN}"]
    assert received.content.startswith(b"From: <alice@other.example>\r\n")


def test_bare_lf_body_reaches_the_mta_with_crlf(listener, sink):
    port = listener()
    status, _ = post(port, encrypted_mail(SENDER, BOB).replace(b"\r\n", b"\n"))
    assert status == 200
    assert b"\r\n" in sink.received[0].content and b"\n\n" not in sink.received[0].content


REFUSALS = [
    # (id, rcpts, body factory, status, reply start)
    ("cleartext", (CAROL,), lambda: load_mail("plain", SENDER, CAROL), 403, "523 Encryption Needed"),
    ("unknown-recipient", (f"nobody@{DOMAIN}",), lambda: encrypted_mail(SENDER, BOB), 404,
     f"550 5.1.1 <nobody@{DOMAIN}>: Recipient address rejected: User unknown"),
    ("other-domain", ("bob@elsewhere.example",), lambda: encrypted_mail(SENDER, BOB), 404,
     "554 5.7.1 <bob@elsewhere.example>: Relay access denied"),
    ("path-in-address", ("../x@" + DOMAIN,), lambda: encrypted_mail(SENDER, BOB), 404, "550 5.1.1"),
    ("no-from-header", (BOB,), lambda: b"Subject: x\r\n\r\nhello\r\n", 403, "500 Invalid FROM"),
    ("not-utf8", (BOB,), lambda: b"From: <a@b.c>\r\n\r\n\xff\xfe\r\n", 403, "554 Non-UTF-8"),
]  # fmt: skip


@pytest.mark.parametrize(("rcpts", "body", "status", "reply"), [r[1:] for r in REFUSALS],
                         ids=[r[0] for r in REFUSALS])  # fmt: skip
def test_port_25_refusals_are_http_errors_with_the_smtp_reply(
    listener, sink, rcpts, body, status, reply
):
    port = listener()
    got_status, text = post(port, body(), rcpts=rcpts)
    assert (got_status, text[: len(reply)]) == (status, reply)
    assert sink.received == []
    assert post(port, encrypted_mail(SENDER, BOB))[0] == 200  # and it keeps serving


def test_unsigned_mail_is_refused_by_the_dkim_check(listener, sink):
    port = listener(skip_dkim=False, dns_resolver="127.0.0.1:9")
    status, text = post(port, encrypted_mail(SENDER, BOB))
    assert status in (403, 503) and "DKIM" in text, text
    assert sink.received == []


BAD_REQUESTS = [
    ("no-x-mail-to", {"rcpts": ()}, 400, "500 Missing X-Mail-To"),
    ("no-x-mail-from", {"mail_from": None}, 400, "500 Missing or invalid X-Mail-From"),
    ("get", {"method": "GET"}, 405, "500 HTTP method"),
    ("other-path", {"path": "/other"}, 404, "500 Not found"),
    ("chunked", {"headers": {"Transfer-Encoding": "chunked"}}, 411, "500 Content-Length"),
    ("too-large", {"headers": {"Content-Length": str(100 << 20)}}, 413, "552 Message exceeds"),
]


@pytest.mark.parametrize(("kwargs", "status", "reply"), [r[1:] for r in BAD_REQUESTS],
                         ids=[r[0] for r in BAD_REQUESTS])  # fmt: skip
def test_bad_requests_get_a_4xx_and_the_listener_keeps_serving(listener, kwargs, status, reply):
    port = listener()
    got = post(port, b"" if "headers" in kwargs else b"x", **kwargs)
    assert got[0] == status and got[1].startswith(reply), got
    assert post(port, encrypted_mail(SENDER, BOB))[0] == 200


def test_a_client_that_stops_sending_is_dropped(listener, monkeypatch):
    monkeypatch.setattr(mxdeliv, "BODY_TIMEOUT_S", 0.5)
    port = listener()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /mxdeliv HTTP/1.1\r\nX-Mail-From: a@b.c\r\nX-Mail-To: " + BOB.encode()
            + b"\r\nContent-Length: 1000\r\n\r\npartial"
        )  # fmt: skip
        sock.settimeout(5)
        assert sock.recv(100) == b""  # closed without a reply
    assert post(port, encrypted_mail(SENDER, BOB))[0] == 200


@pytest.mark.parametrize(
    ("reply", "status"),
    [("250 2.0.0 Ok", 200), ("451 Local error", 503), ("552 Message exceeds maximum size", 413),
     ("523 Encryption Needed: Invalid Unencrypted Mail", 403),
     ("550 5.1.1 <x@y>: Recipient address rejected: User unknown", 404)],
)  # fmt: skip
def test_http_status_of_smtp_replies(reply, status):
    assert mxdeliv.http_status(reply) == status


# --- sending -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "result"),
    [
        (200, b"250 2.0.0 Ok: queued as X\r\n", "accepted"),
        (403, b"523 Encryption Needed: Invalid Unencrypted Mail\r\n", "refused"),
        (404, b"550 5.1.1 <x@y>: User unknown\r\n", "refused"),
        (404, b"<html><body>404 Not Found</body></html>", "failed"),  # a web server
        (405, b"", "failed"),
        (503, b"451 Local error\r\n", "failed"),
        (500, b"554 whatever\r\n", "failed"),  # only a 4xx status carries a refusal
    ],
    ids=["ok", "523", "550", "html-404", "405", "503", "500"],
)
def test_classify_http_answers(status, body, result):
    assert mxtransport.classify(status, body).result == result


def test_request_head_has_one_x_mail_to_per_recipient():
    head = mxtransport.request_head("mx.example", "a@b.c", ["x@example", "y@example"], 42)
    assert head == (
        b"POST /mxdeliv HTTP/1.1\r\nHost: mx.example\r\nX-Mail-From: a@b.c\r\n"
        b"X-Mail-To: x@example\r\nX-Mail-To: y@example\r\n"
        b"Content-Type: application/octet-stream\r\nContent-Length: 42\r\nConnection: close\r\n\r\n"
    )
    with pytest.raises(ValueError):
        mxtransport.request_head("mx.example", "a@b.c", ["x@example\r\nX-Evil: 1"], 1)


def test_tls_is_verified_except_for_ip_literals_and_underscore_domains():
    assert mxtransport.needs_verified_tls("example.org")
    assert not mxtransport.needs_verified_tls("[192.0.2.1]")
    assert not mxtransport.needs_verified_tls("_chat.example.org")


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.fixture
def ip_relay(loop_thread, sink, make_config, self_signed, tmp_path_factory):
    """An IP-address relay 127.0.0.1 whose /mxdeliv listener speaks TLS (nginx's part)."""
    state = {}

    def start():
        config = make_config("127.0.0.1", postfix_reinject_port_incoming=sink.port)
        make_accounts(config, "bob@[127.0.0.1]")

        async def run():
            handler = mxdeliv.MxdelivServer(config, skip_dkim=True)
            server = await asyncio.start_server(handler.handle, "127.0.0.1", 0, ssl=self_signed)
            return server, handler

        state["server"], state["handler"] = loop_thread.run(run())
        return state["server"].sockets[0].getsockname()[1]

    yield start
    if state:
        loop_thread.run(_close(state["server"], state["handler"]))


@pytest.fixture
def smtp_channel(loop_thread):
    """Postfix's loopback listener of the SMTP channel."""
    channel = Sink(loop_thread, reply="250 2.0.0 Ok: queued as 5SMTP")
    yield channel
    channel.stop()


@pytest.fixture
def transport(loop_thread, make_config, smtp_channel, tmp_path_factory):
    made = []

    def make(https_port, mta="postfix", **overrides):
        overrides.setdefault("postfix_reinject_port_smtp", smtp_channel.port)
        config = make_config(DOMAIN, counters_dir=tmp_path_factory.mktemp("c"), **overrides)
        made.append(mxtransport.Transport(config, https_port, mta))
        return made[-1]

    yield make
    for t in made:
        t.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


BOB_IP = "bob@[127.0.0.1]"


def test_https_delivery_to_an_ip_relay_with_a_self_signed_certificate(
    loop_thread, ip_relay, sink, transport, smtp_channel
):
    t = transport(ip_relay())
    [reply] = loop_thread.run(t.deliver(SENDER, [BOB_IP], encrypted_mail(SENDER, BOB_IP)))
    assert reply == "250 2.0.0 Ok: channel=https relay=127.0.0.1"
    assert [r.rcpt_tos for r in sink.received] == [[BOB_IP]]
    assert smtp_channel.received == []
    assert t.counters.value("outbound_deliveries_total", channel="https", result="accepted") == 1


def test_refusal_over_https_is_the_receivers_reply(
    loop_thread, ip_relay, sink, transport, smtp_channel
):
    t = transport(ip_relay())
    nobody = "nobody@[127.0.0.1]"
    [reply] = loop_thread.run(t.deliver(SENDER, [nobody], encrypted_mail(SENDER, nobody)))
    assert reply == f"550 5.1.1 <{nobody}>: Recipient address rejected: User unknown"
    assert sink.received == [] and smtp_channel.received == []


def test_refusal_over_https_goes_to_the_smtp_channel_where_the_mta_cannot_bounce_it(
    loop_thread, ip_relay, sink, transport, smtp_channel
):
    """OpenSMTPD 7.6 retries an LMTP 5xx (mail.lmtp, OpenSMTPD issue #1276): there the
    receiver's refusal goes over SMTP, as upstream's transport does, so the receiver refuses
    it on port 25 and the MTA bounces. /mxdeliv worked: the host is not left alone."""
    t = transport(ip_relay(), mta="opensmtpd")
    nobody = "nobody@[127.0.0.1]"
    for _ in range(2):
        [reply] = loop_thread.run(t.deliver(SENDER, [nobody], encrypted_mail(SENDER, nobody)))
        assert reply == "250 2.0.0 Ok: channel=smtp 2.0.0 Ok: queued as 5SMTP"
    assert [r.rcpt_tos for r in smtp_channel.received] == [[nobody], [nobody]]
    assert sink.received == []
    assert t.counters.value("outbound_deliveries_total", channel="https", result="refused") == 2
    assert t.counters.value("outbound_deliveries_total", channel="smtp", result="accepted") == 2


def test_no_https_falls_back_to_smtp_and_the_host_is_left_alone_for_a_while(
    loop_thread, transport, smtp_channel
):
    t = transport(free_port())  # nothing listens there
    mail = encrypted_mail(SENDER, BOB_IP)
    for _ in range(2):
        [reply] = loop_thread.run(t.deliver(SENDER, [BOB_IP], mail))
        assert reply == "250 2.0.0 Ok: channel=smtp 2.0.0 Ok: queued as 5SMTP"
    assert len(smtp_channel.received) == 2
    # the second message did not try HTTPS again
    assert t.counters.value("outbound_deliveries_total", channel="https", result="failed") == 1
    assert t.counters.value("outbound_deliveries_total", channel="smtp", result="accepted") == 2


def test_https_is_tried_again_after_the_remembered_period(loop_thread, ip_relay, sink, transport):
    port = free_port()
    t = transport(port, mxdeliv_retry_after=0)
    mail = encrypted_mail(SENDER, BOB_IP)
    loop_thread.run(t.deliver(SENDER, [BOB_IP], mail))  # refused connection: SMTP
    t.https_port = ip_relay()
    [reply] = loop_thread.run(t.deliver(SENDER, [BOB_IP], mail))
    assert reply.startswith("250 2.0.0 Ok: channel=https")


def test_both_channels_failing_is_a_temporary_error(loop_thread, transport, smtp_channel):
    smtp_channel.reply = "451 4.3.0 queue file write error"
    t = transport(free_port())
    [reply] = loop_thread.run(t.deliver(SENDER, [BOB_IP], encrypted_mail(SENDER, BOB_IP)))
    assert reply.startswith("451")  # Postfix keeps the message and retries
    assert t.counters.value("outbound_deliveries_total", channel="smtp", result="deferred") == 1


def test_lmtp_server_answers_per_recipient(loop_thread, ip_relay, sink, make_config, smtp_channel):
    https_port = ip_relay()
    config = make_config(DOMAIN, postfix_reinject_port_smtp=smtp_channel.port)
    server, t = loop_thread.run(mxtransport.start_server(config, port=0, https_port=https_port))
    try:
        lmtp = smtplib.LMTP("127.0.0.1", server.sockets[0].getsockname()[1])
        lmtp.ehlo_or_helo_if_needed()
        lmtp.mail(SENDER)
        for rcpt in (BOB_IP, "bob@[127.0.0.2]"):  # no HTTPS listener there
            lmtp.rcpt(rcpt)
        lmtp.putcmd("data")
        assert lmtp.getreply()[0] == 354
        lmtp.send(encrypted_mail(SENDER, BOB_IP) + b".\r\n")
        first, second = lmtp.getreply(), lmtp.getreply()
        assert first[0] == 250 and b"channel=https" in first[1]
        assert second[0] == 250 and b"channel=smtp" in second[1]
        assert [r.rcpt_tos for r in smtp_channel.received] == [["bob@[127.0.0.2]"]]
        lmtp.quit()
    finally:
        loop_thread.run(_close(server, t))


@pytest.mark.parametrize("mail_from", [SENDER, ""], ids=["sender", "bounce"])
@pytest.mark.parametrize("mta", ["opensmtpd", "postfix"])
def test_lmtp_from_smtpds_delivery_agent_loses_the_agents_headers(
    loop_thread, ip_relay, sink, make_config, smtp_channel, mta, mail_from
):
    """smtpd's LMTP delivery agent writes Return-Path (when there is a sender) and
    Delivered-To on top of the message (tests/salt/test_opensmtpd_mxtransport_live.py): they
    are no part of it, and an OpenSMTPD receiver would take its own recipient's
    Delivered-To for a mail loop. Postfix's LMTP client adds none: nothing is cut there."""
    message = encrypted_mail(SENDER, BOB_IP)
    agent = (f"Return-Path: <{mail_from}>\r\n" if mail_from else "") + "Delivered-To: BOB@[127.0.0.1]\r\n"
    config = make_config(DOMAIN, postfix_reinject_port_smtp=smtp_channel.port)
    server, t = loop_thread.run(
        mxtransport.start_server(config, port=0, https_port=ip_relay(), mta=mta)
    )
    try:
        with smtplib.LMTP("127.0.0.1", server.sockets[0].getsockname()[1]) as lmtp:
            lmtp.sendmail(mail_from, [BOB_IP], agent.encode() + message)
    finally:
        loop_thread.run(_close(server, t))
    [received] = sink.received
    assert received.content.startswith(message if mta == "opensmtpd" else agent.encode())


def test_parse_head_takes_upstreams_spellings():
    """Header names are case-insensitive (upstream's filtermail writes X-MAIL-FROM); a proxy
    may fold repeated X-Mail-To into one comma-separated line."""
    head = (
        b"POST /mxdeliv HTTP/1.1\r\nHost: relay.example\r\nX-MAIL-FROM: <a@b.example>\r\n"
        b"X-MAIL-TO: x@relay.example\r\nx-mail-to: <y@relay.example>, z@relay.example\r\n"
        b"Content-Length: 7"
    )
    delivery = mxdeliv.parse_head(head)
    assert delivery == mxdeliv.Delivery(
        "a@b.example", ["x@relay.example", "y@relay.example", "z@relay.example"], 7
    )


def test_empty_x_mail_from_is_the_null_sender():
    head = b"POST /mxdeliv HTTP/1.1\r\nX-Mail-From: \r\nX-Mail-To: x@r.example\r\nContent-Length: 0"
    assert mxdeliv.parse_head(head).mail_from == ""


def test_an_address_unfit_for_a_header_goes_over_smtp(loop_thread, transport, smtp_channel):
    t = transport(free_port())
    odd = '"a b"@[127.0.0.1]'  # a quoted local part with a space
    [reply] = loop_thread.run(t.deliver(SENDER, [odd], encrypted_mail(SENDER, BOB_IP)))
    assert reply.startswith("250 2.0.0 Ok: channel=smtp")
    assert smtp_channel.received[0].rcpt_tos == [odd]
