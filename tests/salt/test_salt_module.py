"""The formula's execution module (salt/_modules/chatmail.py) over the real
chatmail-adminctl protocol: the same operations, the same audit log as the API."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
from pathlib import Path

import pytest

from chatmaild import adminctl
from chatmaild.accounts import authenticate_or_create

MODULE = Path(__file__).resolve().parents[2] / "salt" / "_modules" / "chatmail.py"
DOMAIN = "chat.example.org"


@pytest.fixture
def chatmail(example_config, tmp_path):
    """The module as Salt loads it, pointed at an api.json naming a live helper socket."""
    sock_path = tmp_path / "accounts.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    server.listen(4)

    def loop():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as rfile, conn.makefile("wb") as wfile:
                adminctl.serve_one(example_config, "accounts", "postfix", rfile, wfile)

    threading.Thread(target=loop, daemon=True).start()
    state = tmp_path / "api-state"
    state.mkdir()
    settings = tmp_path / "api.json"
    settings.write_text(json.dumps({"accounts_socket": str(sock_path), "queue_socket": None,
                                    "state_dir": str(state), "listen": "127.0.0.1", "port": 1}))  # fmt: skip
    spec = importlib.util.spec_from_file_location("salt_chatmail_module", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__opts__ = {"chatmail.api_settings": str(settings)}
    yield module
    server.close()


def test_account_operations_and_audit(chatmail, example_config, tmp_path):
    addr = f"salted123@{DOMAIN}"
    assert authenticate_or_create(example_config, addr, "password-123").ok
    assert chatmail.__virtual__() == "chatmail"
    assert chatmail.account_info(addr)["exists"] is True
    assert chatmail.block(addr, reason="spam")["changed"] is True
    assert chatmail.account_info(addr)["blocked"]["by"] == "salt"
    assert chatmail.unblock(addr) == {"changed": True}
    assert chatmail.delete_account(addr) == {"mailbox_removed": True}
    assert not (example_config.mailboxes_path / addr).exists()
    with pytest.raises(RuntimeError, match="404"):
        chatmail.account_info(f"nobody123@{DOMAIN}")
    with pytest.raises(RuntimeError, match="422"):
        chatmail.block("../etc@" + DOMAIN)
    with pytest.raises(RuntimeError, match="no chatmail-adminctl"):
        chatmail.queue()
    audit = (tmp_path / "api-state" / "audit.log").read_text().splitlines()
    assert [json.loads(line)["action"] for line in audit] == ["block", "unblock", "delete"]
    assert {json.loads(line)["by"] for line in audit} == {"salt"}
