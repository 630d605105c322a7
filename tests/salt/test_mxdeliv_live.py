"""POST /mxdeliv through the rendered nginx.conf, run for real: the sending transport's
HTTPS client -> nginx (TLS, body limit) -> the real /mxdeliv listener -> a recording SMTP
sink standing in for the MTA's reinjection port. The stream switch (which adds the PROXY
header) and the system paths are cut out; the http block runs as rendered."""

from __future__ import annotations

import http.client
import re
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from test_render import stand_in

from filtermail_support import LoopThread, Sink, encrypted_mail

from chatmaild import mxdeliv, mxtransport
from chatmaild.config import load_config
from chatmaild.user import User


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def relay(render, test_cert, tmp_path_factory):
    """(nginx port, listener config, sink, loop thread) of a rendered _ relay."""
    rendered = render("debian12", "underscore")
    m, s = rendered.map, rendered.map["settings"]
    d = tmp_path_factory.mktemp("mxdeliv-live")
    loop_thread = LoopThread()
    sink = Sink(loop_thread)
    ini = rendered.path("/usr/local/lib/chatmaild/chatmail.ini").read_text()
    ini = re.sub(r"(?m)^(mailboxes_dir|counters_dir|postfix_reinject_port_incoming) = .*$", "", ini)
    ini += f"\nmailboxes_dir = {d}/mail\ncounters_dir = {d}/counters\n"
    ini += f"postfix_reinject_port_incoming = {sink.port}\n"
    (d / "chatmail.ini").write_text(ini)
    config = load_config(d / "chatmail.ini").config
    bob = User(config.mailboxes_path, f"bob@{config.address_domain}")
    bob.maildir.mkdir(parents=True)
    bob.password_path.write_text("{SHA512-CRYPT}x")
    server, handler = loop_thread.run(mxdeliv.start_server(config, port=0, skip_dkim=True))
    listener = server.sockets[0].getsockname()[1]

    port = free_port()
    text = stand_in(rendered.text("/etc/nginx/nginx.conf"), m, *test_cert)
    text = re.sub(r"(?ms)^stream \{.*?^\}\n", "", text)
    text = re.sub(r"^(user|include /etc/nginx/modules-enabled/).*;$", "", text, flags=re.MULTILINE)
    text = text.replace("pid /run/nginx.pid;", f"pid {d}/nginx.pid;")
    text = re.sub(r"error_log [^;]+;", f"error_log {d}/error.log;", text)
    text = re.sub(r"access_log [^;]+;", "access_log off;", text)
    # port 80's server on a loopback port of its own (a server without `listen` is *:80,
    # which a relay container on this host may hold)
    text = re.sub(r"listen \d+;", f"listen 127.0.0.1:{free_port()};", text)
    # no 443 switch in front: no PROXY header either
    text = text.replace(f"listen 127.0.0.1:{m['ports']['https_internal']} ssl proxy_protocol", f"listen 127.0.0.1:{port} ssl")  # fmt: skip
    text = text.replace("real_ip_header proxy_protocol;", "")
    upstream = f"{s['filtermail_host']}:{s['filtermail_http_port_incoming']}"
    assert f"proxy_pass http://{upstream};" in text
    text = text.replace(upstream, f"127.0.0.1:{listener}")
    # nginx buffers request bodies in files its workers (nobody here) can write
    body_dir = Path(tempfile.mkdtemp(prefix="cm-nginx-body-"))
    body_dir.chmod(0o777)
    text = text.replace("http {", f"http {{\n    client_body_temp_path {body_dir};", 1)
    (d / "nginx.conf").write_text(text)
    nginx = subprocess.Popen(
        ["nginx", "-c", str(d / "nginx.conf"), "-g", "daemon off;"],
        stderr=subprocess.PIPE,
        text=True,
    )
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert nginx.poll() is None, nginx.stderr.read()
            time.sleep(0.05)
    else:
        nginx.terminate()
        pytest.fail(f"nginx does not listen on {port}: {(d / 'error.log').read_text()[-2000:]}")
    yield port, config, sink, loop_thread
    nginx.terminate()
    nginx.wait(timeout=10)

    async def close():
        server.close()
        handler.close()

    loop_thread.run(close())
    sink.stop()
    loop_thread.stop()
    shutil.rmtree(body_dir, ignore_errors=True)


def transport(config, port: int) -> mxtransport.Transport:
    return mxtransport.Transport(config, https_port=port)


def test_transport_posts_through_nginx_to_the_listener(relay):
    port, config, sink, loop_thread = relay
    bob = f"bob@{config.mail_domain}"
    t = transport(config, port)
    try:
        mail = encrypted_mail("alice@other.example", bob)
        outcome = loop_thread.run(
            t.post("127.0.0.1", config.mail_domain, "alice@other.example", [bob], mail)
        )
    finally:
        t.close()
    assert outcome == mxtransport.Outcome("accepted", "250 2.0.0 Ok: queued as 4ABCDEF")
    assert sink.received[-1].rcpt_tos == [bob]
    assert sink.received[-1].content == mail


def test_a_refusal_crosses_nginx_with_its_smtp_reply(relay):
    port, config, _, loop_thread = relay
    nobody = f"nobody@{config.mail_domain}"
    t = transport(config, port)
    try:
        outcome = loop_thread.run(
            t.post("127.0.0.1", config.mail_domain, "a@b.example", [nobody], b"x\r\n")
        )
    finally:
        t.close()
    assert outcome.result == "refused"
    assert outcome.detail == f"550 5.1.1 <{nobody}>: Recipient address rejected: User unknown"


def raw_post(port: int, length: int, body: bytes = b"") -> tuple[int, str]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    conn.putrequest("POST", "/mxdeliv")
    conn.putheader("X-Mail-From", "a@b.example")
    conn.putheader("X-Mail-To", "bob@x")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    try:
        conn.send(body)
    except OSError:
        pass
    response = conn.getresponse()
    return response.status, response.read().decode()


def test_nginx_refuses_100_mb_with_the_smtp_reply_before_reading_it(relay):
    port = relay[0]
    assert raw_post(port, 100 << 20, b"x" * 1000) == (413, "552 Message exceeds maximum size")
    # the listener's own checks still answer behind it
    status, text = raw_post(port, 1, b"x")
    assert status == 404 and "Relay access denied" in text
