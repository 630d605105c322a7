"""filtermail over real sockets: smtplib client -> filtermail -> recording aiosmtpd sink."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import smtplib
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from aiosmtpd.smtp import SMTP
from filtermail_support import Filtermail, LoopThread, Sink, encrypted_mail, load_mail, send

from chatmaild.filtermail import split_params
from chatmaild.policy import refuses_cleartext
from chatmaild.smtpclient import LOCAL_ERROR, Recipient, Reinjector

SENDER = "alice@chat.example.org"
OTHER = "bob@other.example"


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="filtermail")


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


@pytest.fixture
def start(loop_thread, sink, make_config):
    """``start(mode, **config_overrides)`` -> a running Filtermail reinjecting into ``sink``."""
    started = []

    def start(mode: str = "outgoing", **overrides) -> Filtermail:
        overrides.setdefault("postfix_reinject_port", sink.port)
        overrides.setdefault("postfix_reinject_port_incoming", sink.port)
        config = make_config("chat.example.org", **overrides)
        fm = Filtermail(loop_thread, config, mode, skip_dkim=True)
        started.append(fm)
        return fm

    yield start
    for fm in started:
        fm.stop()


# -- outgoing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["encrypted", "encrypted-symmetric", "encrypted-partial", "securejoin-vc"]
)
def test_outgoing_accepts_encrypted_byte_identical(start, sink, name):
    fm = start("outgoing")
    data = load_mail(name, SENDER, OTHER)
    code, text = send(fm.port, SENDER, [OTHER], data)
    assert (code, text) == (250, "2.0.0 Ok: queued as 4ABCDEF")  # the reinjection's reply
    [got] = sink.received
    assert got.content == data
    assert (got.mail_from, got.rcpt_tos) == (SENDER, [OTHER])


def test_outgoing_large_encrypted_with_dot_lines(start, sink):
    fm = start("outgoing")
    data = encrypted_mail(SENDER, OTHER, size=2_000_000)
    # Lines starting with "." must survive dot-stuffing in both hops. The preamble that
    # held them is cut now (cleartext), so a self-sent Autocrypt Setup Message carries them.
    dotted = data.replace(
        b"\r\n\r\n--Xb8nFq2Wt0\r\n", b"\r\n\r\n.hidden\r\n..\r\n.\r\n--Xb8nFq2Wt0\r\n", 1
    )
    assert send(fm.port, SENDER, [OTHER], dotted)[0] == 250
    assert sink.received[0].content == data
    asm = load_mail("asm", SENDER, SENDER).replace(b"</pre>", b".hidden\r\n..\r\n.\r\n</pre>")
    assert send(fm.port, SENDER, [SENDER], asm)[0] == 250
    assert sink.received[1].content == asm


@pytest.mark.parametrize(
    "name", ["plain", "literal", "fake-encrypted", "mdn", "securejoin-vc-fake", "mailer-daemon"]
)
def test_outgoing_rejects_unencrypted(start, sink, name, caplog):
    fm = start("outgoing")
    data = load_mail(name, SENDER, OTHER)
    if name == "mailer-daemon":
        data = data.replace(b"MAILER-DAEMON@test.example.org", SENDER.encode())
    assert send(fm.port, SENDER, [OTHER], data) == (
        523,
        "Encryption Needed: Invalid Unencrypted Mail",
    )
    assert sink.received == []
    assert "Outgoing: Filtering unencrypted mail." in caplog.text
    assert f"Rejected unencrypted mail from: {SENDER}" in caplog.text


def test_outgoing_autocrypt_setup_message_only_to_self(start, sink):
    fm = start("outgoing")
    assert send(fm.port, SENDER, [SENDER], load_mail("asm", SENDER, SENDER))[0] == 250
    assert send(fm.port, SENDER, [OTHER], load_mail("asm", SENDER, OTHER))[0] == 523
    assert send(fm.port, SENDER, [SENDER, OTHER], load_mail("asm", SENDER, SENDER))[0] == 523
    assert len(sink.received) == 1


def test_outgoing_logs_encrypted(start, caplog):
    fm = start("outgoing")
    send(fm.port, SENDER, [OTHER], load_mail("encrypted", SENDER, OTHER))
    assert "Outgoing: Filtering encrypted mail." in caplog.text


@pytest.mark.parametrize(
    "header_from,reply",
    [
        (
            "mallory@chat.example.org",
            "Invalid FROM <mallory@chat.example.org> for <alice@chat.example.org>",
        ),
        ("someone@example.org", "Invalid FROM <someone@example.org> for <alice@chat.example.org>"),
        ("Alice <ALICE@Chat.Example.org>", None),
    ],
    ids=["forged-local", "forged-foreign", "case-insensitive"],
)
def test_outgoing_from_must_match_envelope(start, sink, header_from, reply):
    fm = start("outgoing")
    data = load_mail("encrypted", header_from, OTHER)
    code, text = send(fm.port, SENDER, [OTHER], data)
    if reply is None:
        assert code == 250
    else:
        assert (code, text) == (500, reply)
        assert sink.received == []


@pytest.mark.parametrize(
    "from_header,problem",
    [(None, "missing"), ("not an address", "unparsable"), ("a@x.org, b@y.org", "unparsable")],
    ids=["missing", "garbage", "two-addresses"],
)
def test_outgoing_invalid_from_header(start, from_header, problem):
    fm = start("outgoing")
    data = load_mail("encrypted", SENDER, OTHER).replace(f"From: {SENDER}\r\n".encode(), b"")
    if from_header:
        data = f"From: {from_header}\r\n".encode() + data
    assert send(fm.port, SENDER, [OTHER], data) == (500, f"Invalid FROM header: {problem}")


def test_outgoing_two_from_headers(start):
    fm = start("outgoing")
    data = f"From: {SENDER}\r\n".encode() + load_mail("encrypted", SENDER, OTHER)
    assert send(fm.port, SENDER, [OTHER], data) == (500, "Invalid FROM header: 2 headers")


@pytest.mark.parametrize("mail_from", ["no-at-sign", '"a@b"@chat.example.org'])
def test_outgoing_invalid_envelope_sender(start, mail_from):
    fm = start("outgoing")
    code, text = send(fm.port, mail_from, [OTHER], b"")
    assert (code, text) == (500, f"Invalid from address <{mail_from}>")


def test_outgoing_rate_limit_after_burst(start, sink):
    fm = start("outgoing", max_user_send_per_minute=60, max_user_send_burst_size=10)
    data = load_mail("encrypted", SENDER, OTHER)
    codes = []
    with smtplib.SMTP("127.0.0.1", fm.port) as client:
        client.ehlo("postfix.local")
        for _ in range(12):
            code, text = client.mail(SENDER)
            codes.append(code)
            if code == 250:
                client.rcpt(OTHER)
                client.data(data)
    assert codes == [250] * 10 + [450, 450]
    assert text.decode().startswith(f"4.7.1: Too much mail from {SENDER}, rate limited until ")
    assert len(sink.received) == 10
    # Another sender has its own budget.
    other = "carol@chat.example.org"
    assert send(fm.port, other, [OTHER], load_mail("encrypted", other, OTHER))[0] == 250
    time.sleep(1.1)  # one more per second
    assert send(fm.port, SENDER, [OTHER], data)[0] == 250


def test_dsn_and_size_parameters_accepted(start, sink):
    fm = start("outgoing")
    data = load_mail("encrypted", SENDER, OTHER)
    code, _ = send(
        fm.port,
        SENDER,
        [OTHER, "carol@other.example"],
        data,
        mail_options=[
            f"SIZE={len(data)}",
            "BODY=8BITMIME",
            "RET=HDRS",
            "ENVID=QQ314159",
            "AUTH=<>",
        ],
        rcpt_options=["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;bob@other.example"],
    )
    assert code == 250
    [got] = sink.received
    assert got.rcpt_tos == [OTHER, "carol@other.example"]
    # The sink announces no DSN: only what it supports is passed on.
    assert "BODY=8BITMIME" in got.mail_options
    assert not any(o.startswith(("RET=", "ENVID=")) for o in got.mail_options)


def test_dsn_parameters_passed_on_to_a_dsn_server(loop_thread, start):
    class RecordingSMTP(SMTP):
        """Records raw MAIL/RCPT arguments and hands aiosmtpd only the address part."""

        async def smtp_MAIL(self, arg):
            self.event_handler.commands.append("MAIL " + arg)
            await super().smtp_MAIL(arg.split(" ")[0])

        async def smtp_RCPT(self, arg):
            self.event_handler.commands.append("RCPT " + arg)
            await super().smtp_RCPT(arg.split(" ")[0])

    class DSNSink(Sink):
        """A sink announcing DSN."""

        def make_protocol(self):
            return RecordingSMTP(self, hostname="sink")

        async def handle_EHLO(self, server, session, envelope, hostname, responses):
            session.host_name = hostname
            return responses[:-1] + ["250-DSN", responses[-1]]

    dsn_sink = DSNSink(loop_thread)
    dsn_sink.commands = []
    try:
        fm = start("outgoing", postfix_reinject_port=dsn_sink.port)
        data = load_mail("encrypted", SENDER, OTHER)
        code, _ = send(
            fm.port,
            SENDER,
            [OTHER],
            data,
            mail_options=["RET=FULL", "ENVID=abc"],
            rcpt_options=["NOTIFY=NEVER", "ORCPT=rfc822;Bob@Other.example"],
        )
        assert code == 250
        assert (
            dsn_sink.commands[1] == f"RCPT TO:<{OTHER}> NOTIFY=NEVER ORCPT=rfc822;Bob@Other.example"
        )
        assert "RET=FULL ENVID=abc" in dsn_sink.commands[0]
    finally:
        dsn_sink.stop()


def test_size_limit(start, sink):
    fm = start("outgoing", max_message_size=100_000)
    small = encrypted_mail(SENDER, OTHER, size=50_000)
    big = encrypted_mail(SENDER, OTHER, size=150_000)
    assert send(fm.port, SENDER, [OTHER], big) == (552, "Message exceeds maximum size")
    assert send(fm.port, SENDER, [OTHER], big, mail_options=[f"SIZE={len(big)}"]) == (
        552,
        "Message exceeds maximum size",
    )
    assert send(fm.port, SENDER, [OTHER], small)[0] == 250
    assert len(sink.received) == 1
    with smtplib.SMTP("127.0.0.1", fm.port) as client:
        client.ehlo("x")
        for size in ("12ab", "²", "-1"):  # "²".isdigit() is True, int("²") raises
            client.send(f"MAIL FROM:<{SENDER}> SIZE={size}\r\n".encode())
            code, text = client.getreply()
            assert (code, text) == (501, b"Syntax: MAIL FROM: <address> [SP <mail-parameters>]")


def test_garbage_and_non_utf8_keep_serving(start, sink):
    fm = start("outgoing")
    good = load_mail("encrypted", SENDER, OTHER)
    with smtplib.SMTP("127.0.0.1", fm.port) as client:
        client.ehlo("x")
        assert client.docmd("HELLO?")[0] == 500
        assert client.docmd("MAIL", "FROM:<<<>>>")[0] in (501, 553)
        assert client.docmd("RCPT", "TO:<x@y>")[0] == 503
        assert client.docmd("MAIL FROM:<" + "a" * 3000 + "@x.org>")[0] == 500
        client.mail(SENDER)
        client.rcpt(OTHER)
        bad = good.replace(b"Subject: test", b"Subject: \xff\xfe latin1 \xe9")
        assert client.data(bad) == (554, b"Non-UTF-8 message")
        client.mail(SENDER)
        client.rcpt(OTHER)
        assert client.data(b"\r\n\r\n\r\n")[0] == 500
        client.mail(SENDER)
        client.rcpt(OTHER)
        long_line = b"From: " + b"x" * 100_000 + b"\r\n"
        assert client.data(long_line) == (500, b"Invalid FROM header: unparsable")
        client.mail(SENDER)
        client.rcpt(OTHER)
        huge_header = b"X-Junk: start\r\n" + b" folded junk\r\n" * 100_000
        assert client.data(huge_header + good) == (554, b"Malformed data: header section too large")
        client.mail(SENDER)
        client.rcpt(OTHER)
        assert client.data(good)[0] == 250
    # Raw garbage, binary and a connection dropped mid-DATA.
    for junk in [
        b"\x00\xff\xfe garbage\r\n" * 10,
        b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nabc",
    ]:
        with socket.create_connection(("127.0.0.1", fm.port)) as raw:
            raw.recv(100)
            raw.sendall(junk)
            time.sleep(0.1)
    assert send(fm.port, SENDER, [OTHER], good)[0] == 250
    assert [r.content for r in sink.received] == [good, good]


def test_reinjection_rejection_and_outage(loop_thread, start, sink):
    rejecting = Sink(loop_thread, reply="550 5.7.1 Go away")
    fm = start("outgoing", postfix_reinject_port=rejecting.port)
    data = load_mail("encrypted", SENDER, OTHER)
    assert send(fm.port, SENDER, [OTHER], data) == (550, "5.7.1 Go away")
    rejecting.stop()
    assert send(fm.port, SENDER, [OTHER], data) == (451, "Local error")


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "lockstep"])
def test_reinjection_refused_recipient_aborts_message(loop_thread, start, pipelining):
    """If Postfix refuses one recipient, nobody gets the message and the client hears why."""

    class PickySink(Sink):
        async def handle_EHLO(self, server, session, envelope, hostname, responses):
            session.host_name = hostname
            extra = ["250-PIPELINING"] if pipelining else []
            return responses[:-1] + extra + [responses[-1]]

        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
            if address.startswith("refused"):
                return "550 5.1.1 No such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

    sink = PickySink(loop_thread)
    try:
        fm = start("outgoing", postfix_reinject_port=sink.port)
        data = load_mail("encrypted", SENDER, OTHER)
        assert send(fm.port, SENDER, [OTHER], data)[0] == 250
        rcpts = [OTHER, "refused@other.example"]
        assert send(fm.port, SENDER, rcpts, data) == (550, "5.1.1 No such user")
        assert send(fm.port, SENDER, [OTHER], data)[0] == 250  # the pool recovered
        assert [r.rcpt_tos for r in sink.received] == [[OTHER], [OTHER]]
    finally:
        sink.stop()


def test_reinjection_reuses_connections(start, sink):
    fm = start("outgoing")
    data = load_mail("encrypted", SENDER, OTHER)
    for _ in range(3):
        assert send(fm.port, SENDER, [OTHER], data)[0] == 250
    assert len(fm.handler.reinjector._idle) == 1
    assert len(sink.received) == 3


def test_stale_pooled_connection_is_replaced(loop_thread, start):
    """Postfix closing an idle reinjection connection must not cost a message."""

    class DroppingSMTP(SMTP):
        async def smtp_MAIL(self, arg):
            if self.event_handler.drop_next_mail:
                self.event_handler.drop_next_mail = False
                self.transport.close()  # dies without a reply, like a killed smtpd
                return
            await super().smtp_MAIL(arg)

    class DroppingSink(Sink):
        drop_next_mail = False

        def make_protocol(self):
            return DroppingSMTP(self, hostname="sink")

    sink = DroppingSink(loop_thread)
    try:
        fm = start("outgoing", postfix_reinject_port=sink.port)
        data = load_mail("encrypted", SENDER, OTHER)
        assert send(fm.port, SENDER, [OTHER], data)[0] == 250
        sink.drop_next_mail = True
        assert send(fm.port, SENDER, [OTHER], data)[0] == 250
        assert len(sink.received) == 2
    finally:
        sink.stop()


def test_retry_after_a_dead_pooled_connection_uses_a_fresh_one():
    """After a Postfix restart every pooled connection is dead: the retry must not take one."""

    class Handler:
        delivered = 0

        async def handle_DATA(self, server, session, envelope):
            self.delivered += 1
            return "250 OK"

    connections: list[SMTP] = []
    doomed: set[SMTP] = set()

    class RestartedSMTP(SMTP):
        def connection_made(self, transport):
            connections.append(self)
            super().connection_made(transport)

        async def smtp_MAIL(self, arg):
            if self in doomed:  # a connection from before the "restart" dies at its next use
                self.transport.close()
                return
            await super().smtp_MAIL(arg)

    async def scenario():
        handler = Handler()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: RestartedSMTP(handler), "127.0.0.1", 0)
        reinjector = Reinjector("127.0.0.1", server.sockets[0].getsockname()[1], timeout=5)
        mail = b"Subject: x\r\n\r\nhi\r\n"
        sends = [reinjector.send(SENDER, [Recipient(OTHER)], mail) for _ in "ab"]
        first = await asyncio.gather(*sends)
        assert len(reinjector._idle) == 2
        doomed.update(connections)
        reply = await reinjector.send(SENDER, [Recipient(OTHER)], mail)
        reinjector.close()
        server.close()
        return first, reply, handler.delivered

    first, reply, delivered = asyncio.run(scenario())
    assert [r[:3] for r in first] == ["250", "250"]
    assert reply.startswith("250") and delivered == 3


@pytest.mark.parametrize(
    "garbage",
    [b"250-" + b"x" * 100_000, "\u00b2\u00b35 ok\r\n".encode()],
    ids=["line-beyond-stream-limit", "unicode-digits"],
)
def test_garbled_reinjection_reply_closes_the_connection(garbage):
    """A reply that is not SMTP fails the message and frees the socket."""

    async def scenario():
        closed = asyncio.Event()

        async def garbling_server(reader, writer):
            writer.write(b"220 sink\r\n")
            await reader.readline()
            writer.write(b"250 sink\r\n")
            await reader.readline()  # MAIL FROM
            writer.write(garbage)
            await reader.read()  # until the client hangs up
            closed.set()
            writer.close()

        server = await asyncio.start_server(garbling_server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reinjector = Reinjector("127.0.0.1", port, timeout=5)
        reply = await reinjector.send(SENDER, [Recipient(OTHER)], b"Subject: x\r\n\r\nhi\r\n")
        await asyncio.wait_for(closed.wait(), 5)
        server.close()
        return reply

    assert asyncio.run(scenario()) == LOCAL_ERROR


def test_concurrent_clients(start, sink):
    fm = start("outgoing")
    senders = [f"user{i}@chat.example.org" for i in range(30)]
    with ThreadPoolExecutor(10) as pool:
        codes = list(
            pool.map(
                lambda s: send(fm.port, s, [OTHER], encrypted_mail(s, OTHER, 50_000))[0], senders
            )
        )
    assert codes == [250] * 30
    assert sorted(r.mail_from for r in sink.received) == sorted(senders)


def test_counters(start, tmp_path):
    fm = start("outgoing")
    send(fm.port, SENDER, [OTHER], load_mail("encrypted", SENDER, OTHER))
    send(fm.port, SENDER, [OTHER], load_mail("plain", SENDER, OTHER))
    send(fm.port, "x@y", [OTHER], b"")  # refused at MAIL: not counted
    accepted = {"direction": "outgoing", "encrypted": "true", "result": "accepted"}
    rejected = {"direction": "outgoing", "encrypted": "false", "result": "rejected"}
    path = tmp_path / "counters" / "filtermail-outgoing.json"
    deadline = time.monotonic() + 5  # the file is rewritten at most once a second
    while time.monotonic() < deadline:
        rows = json.loads(path.read_text()) if path.exists() else {}
        values = [(r["labels"], r["value"]) for r in rows.get("mail_filtered_total", [])]
        if sorted(values, key=str) == sorted([(accepted, 1.0), (rejected, 1.0)], key=str):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"counters file never showed both: {values}")


# -- incoming ---------------------------------------------------------------------------

LOCAL = "dave@chat.example.org"


def enforce_e2ee(make_config, addr):
    mailboxes = make_config().mailboxes_path
    (mailboxes / addr).mkdir(parents=True, exist_ok=True)
    (mailboxes / addr / "enforceE2EEincoming").touch()
    return mailboxes


def test_incoming_encrypted_accepted_and_sender_kept(start, sink, make_config, caplog):
    enforce_e2ee(make_config, LOCAL)
    fm = start("incoming")
    data = load_mail("encrypted", OTHER, LOCAL)
    assert send(fm.port, OTHER, [LOCAL], data)[0] == 250
    assert sink.received[0].mail_from == OTHER
    assert sink.received[0].content == data
    assert "Incoming: Filtering encrypted mail." in caplog.text


def test_incoming_envelope_sender_reset_when_different(start, sink):
    fm = start("incoming")
    data = load_mail("encrypted", OTHER, LOCAL)
    assert send(fm.port, "srs0=abc=xy=other.example=bob@forwarder.example", [LOCAL], data)[0] == 250
    assert sink.received[0].mail_from == "<>"


def test_incoming_smtputf8(start, sink):
    fm = start("incoming")
    sender = "jörg@bücher.example"
    data = load_mail("encrypted", f"Jörg <{sender}>", LOCAL)
    with smtplib.SMTP("127.0.0.1", fm.port) as client:
        client.ehlo("mx.xn--bcher-kva.example")
        assert client.mail(sender, ["SMTPUTF8", "BODY=8BITMIME"])[0] == 250
        assert client.rcpt(LOCAL)[0] == 250
        assert client.data(data)[0] == 250
    [got] = sink.received
    assert got.mail_from == sender and got.content == data
    assert "SMTPUTF8" in got.mail_options


def test_incoming_null_sender(start, sink):
    fm = start("incoming")
    data = load_mail("mailer-daemon", OTHER, LOCAL)
    assert send(fm.port, "<>", [LOCAL], data)[0] == 250
    assert sink.received[0].mail_from == "<>"


@pytest.mark.parametrize(
    "rcpt,enforced,code",
    [
        (LOCAL, False, 250),
        (LOCAL, True, 523),
        ("Dave@Chat.Example.org", True, 523),
        ("dave+tag@chat.example.org", True, 523),
        ("nobody@chat.example.org", True, 250),
    ],
    ids=["not-enforced", "enforced", "enforced-case", "enforced-extension", "missing-mailbox"],
)
def test_incoming_cleartext(start, sink, make_config, rcpt, enforced, code, caplog):
    if enforced:
        enforce_e2ee(make_config, LOCAL)
    fm = start("incoming")
    assert send(fm.port, OTHER, [rcpt], load_mail("plain", OTHER, rcpt))[0] == code
    assert len(sink.received) == (code == 250)
    assert "Incoming: Filtering unencrypted mail." in caplog.text


def test_incoming_cleartext_rejected_if_any_recipient_enforces(start, sink, make_config):
    enforce_e2ee(make_config, LOCAL)
    fm = start("incoming")
    rcpts = ["nobody@chat.example.org", LOCAL]
    assert send(fm.port, OTHER, rcpts, load_mail("plain", OTHER, LOCAL))[0] == 523
    assert sink.received == []


def test_incoming_mailer_daemon_report_accepted(start, sink, make_config, caplog):
    enforce_e2ee(make_config, LOCAL)
    fm = start("incoming")
    data = load_mail("mailer-daemon", OTHER, LOCAL)
    assert send(fm.port, "<>", [LOCAL], data)[0] == 250
    assert (
        "Incoming: Filtering mailer-daemon message from MAILER-DAEMON@test.example.org"
        in caplog.text
    )
    # An MDN is a report too, but not from a mailer-daemon.
    assert send(fm.port, OTHER, [LOCAL], load_mail("mdn", OTHER, LOCAL))[0] == 523


@pytest.mark.parametrize(
    "rcpt,refuses",
    [
        ("nobody@chat.example.org", False),
        ("../etc@chat.example.org", True),
        ("a/b@chat.example.org", True),
        ("no-at-sign", True),
        ("@chat.example.org", True),
        ("dave@", True),
    ],
)
def test_refuses_cleartext(tmp_path, rcpt, refuses):
    assert refuses_cleartext(tmp_path, rcpt) is refuses


@pytest.mark.parametrize(
    "arg,rest,params",
    [
        ("TO:<a@b>", "TO:<a@b>", {}),
        ("TO:<a@b> NOTIFY=NEVER", "TO:<a@b>", {"NOTIFY": "NEVER"}),
        (
            "TO:<a@b> notify=SUCCESS ORCPT=rfc822;A@B",
            "TO:<a@b>",
            {"NOTIFY": "SUCCESS", "ORCPT": "rfc822;A@B"},
        ),
        ("TO:<a@b> FOO=1 NOTIFY=NEVER", "TO:<a@b> FOO=1", {"NOTIFY": "NEVER"}),
        ("TO: NOTIFY=NEVER", "TO:", {"NOTIFY": "NEVER"}),
        (None, None, {}),
    ],
)
def test_split_params(arg, rest, params):
    assert split_params(arg, frozenset({"NOTIFY", "ORCPT"})) == (rest, params)


def test_console_script(make_config, ini_path, sink, tmp_path):
    """``filtermail INI outgoing`` as systemd runs it: serves, logs, stops on SIGTERM."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    make_config(filtermail_smtp_port=port, postfix_reinject_port=sink.port)
    process = subprocess.Popen(
        [sys.executable, "-m", "chatmaild.filtermail", str(ini_path), "outgoing"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stderr.readline()
        assert "entering serving loop" in line
        data = load_mail("encrypted", SENDER, OTHER)
        assert send(port, SENDER, [OTHER], data)[0] == 250
        assert send(port, SENDER, [OTHER], load_mail("plain", SENDER, OTHER))[0] == 523
    finally:
        process.terminate()
        _, err = process.communicate(timeout=10)
    assert process.returncode == 0
    assert "Outgoing: Filtering encrypted mail." in err
    assert sink.received[0].content == data


def test_console_script_incoming_skip_dkim(make_config, ini_path, sink):
    """Upstream's blackbox test: ``FILTERMAIL_SKIP_DKIM=1 filtermail INI incoming``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    make_config(filtermail_smtp_port_incoming=port, postfix_reinject_port_incoming=sink.port)
    process = subprocess.Popen(
        [sys.executable, "-m", "chatmaild.filtermail", str(ini_path), "incoming"],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "FILTERMAIL_SKIP_DKIM": "1"},
    )
    try:
        assert "DKIM verification DISABLED!" in process.stderr.readline()
        assert "entering serving loop" in process.stderr.readline()
        data = load_mail("encrypted", OTHER, LOCAL)  # no DKIM signature
        assert send(port, OTHER, [LOCAL], data)[0] == 250
        assert send(port, OTHER, [LOCAL], load_mail("fake-encrypted", OTHER, LOCAL))[0] == 250
    finally:
        process.terminate()
        process.communicate(timeout=10)
    assert sink.received[0].content == data


def test_console_script_bad_config(tmp_path):
    ini = tmp_path / "chatmail.ini"
    ini.write_text("[params]\nmail_domain = x.org\nmax_message_size = huge\n")
    result = subprocess.run(
        [sys.executable, "-m", "chatmaild.filtermail", str(ini), "incoming"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "max_message_size" in result.stderr


@pytest.mark.parametrize(
    "mode,overrides,message",
    [
        ("incoming", {"dns_resolver": "127.0.0.1:notaport"}, "cannot start the incoming filter"),
        ("outgoing", {"filtermail_host": "192.0.2.1"}, "cannot start the outgoing filter"),
    ],
    ids=["bad-dns-resolver", "address-not-local"],
)
def test_console_script_start_failure(make_config, ini_path, mode, overrides, message):
    make_config(**overrides)
    result = subprocess.run(
        [sys.executable, "-m", "chatmaild.filtermail", str(ini_path), mode],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "change",
    [
        (b"MAILER-DAEMON@test.example.org>", b"MAILER-DAEMON@[192.0.2.1]>"),
        (b"Auto-Submitted: auto-replied", b"Auto-Submitted: no"),
        (b"Auto-Submitted: auto-replied", b"Auto-Submitted: yes"),
        (b"report-type=delivery-status", b"report-type=disposition-notification"),
        (b"Content-Type: message/delivery-status", b"Content-Type: text/plain"),
        (b"MAILER-DAEMON@", b"MAILER-DAEMON.x@"),
    ],
    ids=["ip-literal-sender", "auto-submitted-no", "auto-submitted-other", "not-dsn",
         "no-status-part", "other-localpart"],
)  # fmt: skip
def test_incoming_bounce_exception_is_strict(start, sink, make_config, change):
    """Only a real bounce passes in cleartext to an account that refuses cleartext; an
    IP-address sender can't be authenticated, so its "bounce" never does."""
    enforce_e2ee(make_config, LOCAL)
    fm = start("incoming")
    data = load_mail("mailer-daemon", OTHER, LOCAL)
    changed = data.replace(*change)
    assert changed != data
    assert send(fm.port, "<>", [LOCAL], changed)[0] == 523
    assert sink.received == []


def test_incoming_bounce_needs_the_null_envelope_sender(start, sink, make_config):
    enforce_e2ee(make_config, LOCAL)
    fm = start("incoming")
    data = load_mail("mailer-daemon", OTHER, LOCAL)
    assert send(fm.port, "MAILER-DAEMON@test.example.org", [LOCAL], data)[0] == 523
    assert send(fm.port, "<>", [LOCAL], data)[0] == 250


@pytest.mark.parametrize(
    ("preamble", "epilogue"),
    [(b"Buy now!\r\n", b""), (b"", b"P.S. cleartext\r\n"), (b"Hi\r\n", b"\r\nBye\r\n")],
    ids=["preamble", "epilogue", "both"],
)
def test_text_around_encrypted_parts_is_cut(start, sink, preamble, epilogue):
    fm = start("incoming")
    data = load_mail("encrypted", OTHER, LOCAL)
    notice = b"This is an OpenPGP/MIME encrypted message (RFC 4880 and 3156)\r\n"
    assert notice in data
    changed = data.replace(notice, preamble, 1) + epilogue
    assert send(fm.port, OTHER, [LOCAL], changed)[0] == 250
    assert sink.received[0].content == data.replace(notice, b"", 1)
