"""Local preview: build, serve on localhost, rebuild when a source, the layout or the ini changes.

The preview answers ``POST /new`` like the relay's API does (same credential generator:
``email``, ``password``, plus ``dclogin_url`` for self-signed relays), so the self-signed
account flow can be tried in a browser. No account exists anywhere.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from chatmail_www.build import (
    NEW_ACCOUNT_PATH,
    TEMPLATE_DIR,
    BuildError,
    build,
    source_dir,
)

from chatmaild.config import ConfigError, read_config
from chatmaild.newcreds import create_credentials

log = logging.getLogger("chatmail_www.preview")

POLL_SECONDS = 0.5
# The pages need nothing beyond their own origin; the preview enforces that, so a page
# that would break under this policy (inline script, external font) fails in the tests.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _snapshot(paths: list[Path]) -> dict[str, tuple[float, int]]:
    """mtime and size of every file under ``paths``, to notice edits without extra packages."""
    state = {}
    for root in paths:
        candidates = [root] if root.is_file() else root.rglob("*") if root.is_dir() else []
        for path in candidates:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            state[str(path)] = (stat.st_mtime, stat.st_size)
    return state


class PreviewSite:
    """The output folder plus a lock so requests never see a half-finished rebuild."""

    def __init__(self, ini: Path, out: Path, source: Path | None):
        self.ini, self.out, self.source = ini, out, source
        self.lock = threading.Lock()

    def watched(self) -> list[Path]:
        paths = [self.ini, TEMPLATE_DIR]
        try:
            paths.append(source_dir(read_config(self.ini), self.ini, self.source))
        except ConfigError:
            pass  # the rebuild reports it; keep watching the ini
        return paths

    def rebuild(self) -> None:
        with self.lock:
            try:
                result = build(self.ini, self.out, self.source)
            except (BuildError, ConfigError) as exc:
                log.error("build failed, still serving the last good pages: %s", exc)
                return
        if result.changed:
            log.info("rebuilt: %s", ", ".join(result.written + result.removed))

    def new_account(self) -> dict[str, str]:
        """What the relay's ``POST /new`` answers (chatmaild.newcreds, as the API uses it)."""
        return create_credentials(read_config(self.ini)).model_dump(exclude_none=True)

    def watch(self, stop: threading.Event) -> None:
        seen = _snapshot(self.watched())
        while not stop.wait(POLL_SECONDS):
            now = _snapshot(self.watched())
            if now != seen:
                seen = now
                self.rebuild()


class _Handler(SimpleHTTPRequestHandler):
    def __init__(self, *args, site: PreviewSite, **kwargs):
        self.site = site
        super().__init__(*args, directory=str(site.out), **kwargs)

    def end_headers(self):
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        super().end_headers()

    def do_GET(self):
        with self.site.lock:
            super().do_GET()

    def do_POST(self):
        if self.path.split("?")[0] != NEW_ACCOUNT_PATH:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        try:
            body = json.dumps(self.site.new_account()).encode()
        except ConfigError as exc:
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, str(exc).splitlines()[0])
            return
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        log.debug("%s " + format, self.address_string(), *args)


def make_server(site: PreviewSite, port: int) -> ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1 for the built site and ``POST /new``."""
    return ThreadingHTTPServer(("127.0.0.1", port), partial(_Handler, site=site))


def serve(ini: Path, out: Path, source: Path | None, port: int) -> int:
    site = PreviewSite(ini, out, source)
    try:
        build(ini, out, source)
    except (BuildError, ConfigError) as exc:
        log.error("%s", exc)
        return 1
    server = make_server(site, port)
    stop = threading.Event()
    # Both signals, even where a shell started us with SIGINT ignored.
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    log.info("serving %s at http://127.0.0.1:%d/ (Ctrl-C stops)", out, server.server_address[1])
    try:
        site.watch(stop)
    finally:
        server.shutdown()
        server.server_close()
    return 0
