"""The built pages in headless Chromium: QR codes visible and scannable, account flow, links.

Screenshots go to ``$CHATMAIL_WWW_SCREENSHOTS`` when that is set (to look at the design).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote

import pytest
from chatmail_www.build import TEMPLATE_DIR, build
from chatmail_www.preview import PreviewSite, make_server
from PIL import Image
from www_helpers import (
    DESKTOP,
    PHONE,
    SETTINGS,
    chromium,
    decode_qr,
    parse_page,
    svg_to_image,
)

from chatmaild.config import ConfigError

VIEWS = {"phone": (PHONE, False), "desktop": (DESKTOP, False), "phone-dark": (PHONE, True)}


def assert_dclogin(url: str, domain: str, settings: dict) -> None:
    """The shape of a dclogin: URL from chatmaild.newcreds for a self-signed relay."""
    match = re.fullmatch(r"dclogin:([a-z0-9]+)@([^?]+)\?p=([^&]+)&v=1&ic=3", url)
    assert match, url
    localpart, host, password = match.groups()
    assert host == domain
    assert len(localpart) == settings["username_max_length"]
    assert len(unquote(password)) == settings["password_min_length"] + 3


class RecordingSite(PreviewSite):
    """The preview's /new, remembering what it answered so the test can compare."""

    def __init__(self, *args, fail: bool = False):
        super().__init__(*args)
        self.answers: list[dict[str, str]] = []
        self.fail = fail

    def new_account(self) -> dict[str, str]:
        if self.fail:
            raise ConfigError("relay unavailable for this test")
        answer = super().new_account()
        self.answers.append(answer)
        return answer


@pytest.fixture
def serve(tmp_path):
    """``serve(site, fail=False)`` -> (base URL, RecordingSite); stopped after the test."""
    servers = []

    def start(site, fail: bool = False):
        recording = RecordingSite(site.ini, site.out, None, fail=fail)
        server = make_server(recording, 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}", recording

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def keep_screenshot(path: Path, name: str) -> None:
    target = os.environ.get("CHATMAIL_WWW_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)


@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("kind", ["public", "self"])
def test_screenshot_shows_a_scannable_qr_code(make_site, serve, tmp_path, kind, view):
    site = make_site(kind)
    base, recording = serve(site)
    shot = tmp_path / f"{kind}-{view}.png"
    size, dark = VIEWS[view]
    chromium(f"{base}/index.html", tmp_path / "profile", size=size, screenshot=shot, dark=dark)
    keep_screenshot(shot, f"index-{kind}-{view}.png")
    image = Image.open(shot)
    assert image.size == size
    corner = image.convert("L").getpixel((2, size[1] - 2))
    assert corner < 60 if dark else corner > 200  # the colour scheme applied
    decoded = decode_qr(image)
    if kind == "public":
        assert decoded == [f"DCACCOUNT:https://{site.config.mail_domain}/new"]
        assert recording.answers == []
    else:
        assert len(recording.answers) == 1
        assert decoded == [recording.answers[0]["dclogin_url"]]
        assert_dclogin(decoded[0], "_relay.test", SETTINGS)


@pytest.mark.parametrize("name", ["info.html", "privacy.html"])
def test_other_pages_render(public_site, serve, tmp_path, name):
    base, _ = serve(public_site)
    shot = tmp_path / f"{name}.png"
    chromium(f"{base}/{name}", tmp_path / "profile", size=PHONE, screenshot=shot)
    keep_screenshot(shot, f"{name.removesuffix('.html')}-phone.png")
    # A rendered page, not a blank or error page: many distinct colours in the header area.
    colours = Image.open(shot).convert("RGB").crop((0, 0, PHONE[0], 200)).getcolors(100000)
    assert colours is not None and len(colours) > 20


def test_self_signed_link_and_qr_agree_in_the_live_dom(self_site, serve, tmp_path):
    base, recording = serve(self_site)
    dom = chromium(f"{base}/index.html", tmp_path / "profile", size=PHONE, dump_dom=True)
    (tmp_path / "dom.html").write_text(dom)
    page = parse_page(tmp_path / "dom.html")
    url = recording.answers[-1]["dclogin_url"]
    links = {a.get("id"): a for a in page.attrs("a") if a.get("id")}
    assert links["account-qr"]["href"] == url
    assert links["account-link"]["href"] == url
    assert "aria-disabled" not in links["account-link"]
    svg = re.search(r"<svg.*?</svg>", dom, re.DOTALL).group(0)
    assert decode_qr(svg_to_image(svg)) == [url]
    assert ">_relay.test</text>" in svg
    assert "Scan the code with Delta Chat" in page.plain_text


def test_self_signed_page_explains_a_failing_relay(self_site, serve, tmp_path):
    base, _ = serve(self_site, fail=True)
    dom = chromium(f"{base}/index.html", tmp_path / "profile", size=PHONE, dump_dom=True)
    (tmp_path / "dom.html").write_text(dom)
    page = parse_page(tmp_path / "dom.html")
    assert "Could not get login credentials: the relay answered 503" in page.plain_text
    link = next(a for a in page.attrs("a") if a.get("id") == "account-link")
    assert link["href"] == "#account" and link["aria-disabled"] == "true"
    retry = next(b for b in page.attrs("button") if b.get("id") == "account-again")
    assert "hidden" not in retry and "disabled" not in retry
    assert "<svg" not in dom.split('id="account"')[1].split("</div>")[0]


def test_every_relative_link_is_served(make_site, serve):
    for kind in ("public", "self"):
        site = make_site(kind)
        base, _ = serve(site)
        seen = set()
        for page_path in sorted(site.out.glob("*.html")):
            for _, _, value in parse_page(page_path).urls():
                if ":" in value or value.startswith("#"):
                    continue
                target = value.split("#")[0]
                if target in seen:
                    continue
                seen.add(target)
                with urllib.request.urlopen(f"{base}/{target}", timeout=10) as response:
                    assert response.status == 200, target
                    # Served under a strict policy, so the screenshots prove the pages
                    # need no inline script or foreign resource.
                    csp = response.headers["Content-Security-Policy"]
                    assert csp.startswith("default-src 'self';"), csp
                    assert response.read(), target
        assert "robots.txt" not in seen  # not linked, but served
        with urllib.request.urlopen(f"{base}/robots.txt", timeout=10) as response:
            assert b"Disallow: /" in response.read()


def test_in_browser_encoder_round_trips(tmp_path):
    """account.js's QR encoder against zxing-cpp, across versions 1 to 40 and UTF-8."""
    texts = ["x", "dclogin:abc@_x.test?p=a%40b&v=1&ic=3", "grüße ✓ 漢字 🙂"]
    texts += [
        "".join(chr(33 + (i * 7 + n) % 94) for i in range(n))
        for n in (14, 15, 60, 120, 200, 330, 500, 800, 1200, 1700, 2331)
    ]
    page = tmp_path / "encode.html"
    shutil.copy(TEMPLATE_DIR / "account.js", tmp_path / "account.js")
    page.write_text(
        '<!doctype html><html lang="en"><meta charset="utf-8"><title>t</title>'
        '<script src="account.js"></script><pre id="out"></pre><script>'
        f"const texts = {json.dumps(texts)};"
        "document.getElementById('out').textContent = JSON.stringify(texts.map("
        "(t) => QR.encode(t).map((row) => row.map((d) => (d ? 1 : 0)).join(''))));"
        "</script></html>",
        encoding="utf-8",
    )
    dom = chromium(page.as_uri(), tmp_path / "profile", size=PHONE, dump_dom=True)
    matrices = json.loads(re.search(r'<pre id="out">(.*?)</pre>', dom, re.DOTALL).group(1))
    sizes = []
    for text, rows in zip(texts, matrices, strict=True):
        sizes.append(len(rows))
        quiet = 4
        image = Image.new("L", ((len(rows) + 2 * quiet) * 4,) * 2, 255)
        for y, row in enumerate(rows):
            for x, module in enumerate(row):
                if module == "1":
                    image.paste(
                        0,
                        (
                            (x + quiet) * 4,
                            (y + quiet) * 4,
                            (x + quiet + 1) * 4,
                            (y + quiet + 1) * 4,
                        ),
                    )
        assert decode_qr(image) == [text], (len(text), len(rows))
    assert min(sizes) == 21 and max(sizes) == 177  # version 1 and version 40


def test_preview_command_serves_and_rebuilds(tmp_path, make_config):
    make_config("_relay.test", delete_mails_after=17)
    source = tmp_path / "src"
    source.mkdir()
    (source / "index.md").write_text(
        "# Preview of {{ domain }}\n\nKept {{ config.delete_mails_after }} days.\n"
    )
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatmail_www.build",
            "--ini",
            str(tmp_path / "chatmail.ini"),
            "--out",
            str(tmp_path / "out"),
            "--src",
            str(source),
            "--serve",
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = None
        for line in process.stderr:
            match = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
            if match:
                port = int(match.group(1))
                break
        assert port, "the preview server did not report its address"
        base = f"http://127.0.0.1:{port}"
        assert b"Kept 17 days." in urllib.request.urlopen(f"{base}/index.html", timeout=10).read()

        (source / "index.md").write_text(
            "# Preview of {{ domain }}\n\nNow {{ config.delete_mails_after }}.\n"
        )
        make_config("_relay.test", delete_mails_after=4)  # the ini changes too
        deadline = time.monotonic() + 20
        while True:
            body = urllib.request.urlopen(f"{base}/index.html", timeout=10).read()
            if b"Now 4." in body:
                break
            assert time.monotonic() < deadline, body.decode()
            time.sleep(0.2)

        request = urllib.request.Request(f"{base}/new", data=b"", method="POST")
        answer = json.load(urllib.request.urlopen(request, timeout=10))
        assert answer["email"].endswith("@_relay.test")
        assert answer["dclogin_url"].startswith("dclogin:")
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=20) == 0
        process.stderr.close()


def test_self_signed_flow_against_the_real_api(tmp_path, make_config):
    """Built pages and the control API's POST /new in one server, as nginx combines them."""
    import uvicorn
    from chatmail_api.app import create_app
    from chatmail_api.settings import Settings
    from fastapi.staticfiles import StaticFiles

    # A busy test host must not trip the API's load check.
    config = make_config("_relay.test", **SETTINGS, max_load_1m=10000)
    out = tmp_path / "www"
    build(tmp_path / "chatmail.ini", out)
    settings = Settings(
        chatmail_ini=tmp_path / "chatmail.ini",
        listen="127.0.0.1",
        port=8077,
        state_dir=tmp_path / "api-state",
        version_file=tmp_path / "version",
        tls_cert=tmp_path / "cert.pem",
        service_manager="systemd",
        mta="postfix",
        services=[],
        queue_command=["postqueue", "-j"],
        account_scan_interval_s=0,
        account_stats_file=None,
        dns={"check_interval_s": 0, "dkim_selector": "opendkim", "dkim_txt": tmp_path / "dkim"},
        probe={"enabled": False, "interval_s": 0, "submission_port": 587, "imap_port": 993},
    )
    app = create_app(settings, config)
    app.mount("/", StaticFiles(directory=out, html=True), name="www")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "API did not start"
            time.sleep(0.05)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        shot = tmp_path / "api.png"
        chromium(f"{base}/index.html", tmp_path / "profile", size=PHONE, screenshot=shot)
        (url,) = decode_qr(Image.open(shot))
        assert_dclogin(url, "_relay.test", SETTINGS)

        # Closed account creation: the page shows the API's reason, no QR code.
        config.nocreate_file.write_text("")
        dom = chromium(f"{base}/index.html", tmp_path / "profile", size=PHONE, dump_dom=True)
        (tmp_path / "dom.html").write_text(dom)
        text = parse_page(tmp_path / "dom.html").plain_text
        assert "Could not get login credentials: account creation is closed" in text
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
