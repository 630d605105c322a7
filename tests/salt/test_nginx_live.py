"""The rendered nginx.conf's web server, run for real behind fake PROXY headers.

The 443 switch hands every connection to the HTTPS server with a PROXY header: nginx
must take the client's address from it (not 127.0.0.1), pass it to the API in
X-Forwarded-For, and rate-limit /new per client, an IPv6 client per /64. The stream
block, port 80 and the system paths are cut out; the http block runs as rendered.
"""

from __future__ import annotations

import http.server
import re
import socket
import ssl
import subprocess
import threading
import time
from typing import ClassVar

import pytest
from test_render import stand_in


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backend(http.server.BaseHTTPRequestHandler):
    """The control API's stand-in: answers /new with the forwarded client address."""

    seen: ClassVar[list[str]] = []

    def do_POST(self):
        Backend.seen.append(self.headers.get("X-Forwarded-For", ""))
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def web(render, test_cert, tmp_path_factory):
    """(port, backend) of the rendered web server; nginx runs until the module ends."""
    rendered = render("debian12", "underscore")
    m = rendered.map
    d = tmp_path_factory.mktemp("nginx-live")
    backend = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Backend)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port, plain = free_port(), free_port()
    p = m["ports"]
    text = stand_in(rendered.text("/etc/nginx/nginx.conf"), m, *test_cert)
    text = re.sub(r"(?ms)^stream \{.*?^\}\n", "", text)
    text = re.sub(r"^(user|include /etc/nginx/modules-enabled/).*;$", "", text, flags=re.MULTILINE)
    text = text.replace("pid /run/nginx.pid;", f"pid {d}/nginx.pid;")
    # One request a minute refills the /new bucket: on a loaded CI host a TLS handshake may
    # take longer than the real rate's refill (0.5 s), and an exhausted bucket must stay so.
    text, zones = re.subn(r"(limit_req_zone \S+ zone=newaccount:\S+) rate=\S+;", r"\1 rate=1r/m;", text)
    assert zones == 1, "the /new rate-limit zone is gone from nginx.conf"
    text = re.sub(r"error_log [^;]+;", f"error_log {d}/error.log;", text)
    text = re.sub(r"access_log [^;]+;", "access_log off;", text)
    text = text.replace(f"listen 127.0.0.1:{p['https_internal']} ", f"listen 127.0.0.1:{port} ")
    text = text.replace(f"listen {p['http']};", f"listen 127.0.0.1:{plain};")
    text = text.replace(f"127.0.0.1:{m['api']['port']}", f"127.0.0.1:{backend.server_port}")
    assert "proxy_protocol" in text and f":{p['https']}" not in text
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
    yield port, Backend
    nginx.terminate()
    nginx.wait(timeout=10)
    backend.shutdown()


def post_new(port: int, client: str) -> int:
    """POST /new as ``client`` (the PROXY header's source); the HTTP status."""
    family = "TCP6" if ":" in client else "TCP4"
    server = "::1" if family == "TCP6" else "127.0.0.1"
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    raw.sendall(f"PROXY {family} {client} {server} 40000 443\r\n".encode())
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with context.wrap_socket(raw) as tls:
        tls.sendall(b"POST /new HTTP/1.1\r\nHost: _chat.test\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n")  # fmt: skip
        reply = b""
        while chunk := tls.recv(4096):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


def exhaust(port: int, client: str) -> list[int]:
    return [post_new(port, client) for _ in range(12)]


def test_the_client_address_comes_from_the_proxy_header(web):
    port, backend = web
    assert post_new(port, "192.0.2.7") == 200
    assert backend.seen[-1] == "192.0.2.7"


def test_new_is_limited_per_client(web):
    """One client past the burst gets 429; another address still gets through."""
    port, _ = web
    statuses = exhaust(port, "198.51.100.1")
    assert statuses[0] == 200 and 429 in statuses
    assert post_new(port, "198.51.100.2") == 200


def test_ipv6_clients_are_counted_per_64(web):
    port, backend = web
    assert 429 in exhaust(port, "2001:db8:1:2::1")
    assert post_new(port, "2001:db8:1:2:ffff:ffff:ffff:ffff") == 429  # the same /64
    assert post_new(port, "2001:db8:1:3::1") == 200  # the next /64
    assert backend.seen[-1] == "2001:db8:1:3::1"
