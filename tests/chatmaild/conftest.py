"""Fixtures shared by the chatmaild tests."""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

import pytest

from chatmaild.dictproxy import DictProxy


@pytest.fixture
def serve_dict():
    """``serve_dict(proxy, socket_path)`` runs a dict proxy on a real UNIX socket in a
    thread and returns the path; every server is shut down when the test ends."""
    running = []

    def serve(proxy: DictProxy, socket_path: Path) -> Path:
        server = proxy.make_server(socket_path)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        running.append((server, thread))
        return socket_path

    yield serve
    for server, thread in reversed(running):
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def sock_dir():
    """A short temporary directory for UNIX sockets: their paths are limited to 108 bytes,
    and pytest's tmp_path can be longer."""
    path = Path(tempfile.mkdtemp(prefix="cm-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
