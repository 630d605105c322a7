"""/accounts and /queue: the API over a real chatmail-adminctl protocol on a UNIX socket
(the helper's code in-process, one request per connection as systemd runs it), the
account index as chatmail-accountstats writes it, and the audit log."""

from __future__ import annotations

import json
import os
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from api_support import ADMIN, MONITOR, serve_adminctl
from chatmail_api.app import create_app
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatmaild.accounts import authenticate_or_create
from chatmaild.accountstats import scan_mailboxes, write_index

DOMAIN = "chat.example.org"


@pytest.fixture
def relay(api_settings, tmp_path):
    """(client, config, addresses): three accounts, indexed, behind the helper's socket."""
    sock = tmp_path / "accounts.sock"
    index = tmp_path / "accounts.json"
    settings, config = api_settings(
        accounts_socket=str(sock), account_index_file=str(index), account_scan_interval_s=0
    )
    addrs = [f"user{n:05d}@{DOMAIN}" for n in (1, 2, 3)]
    for n, addr in enumerate(addrs):
        assert authenticate_or_create(config, addr, "password-123").ok
        cur = config.mailboxes_path / addr / "cur"
        cur.mkdir()
        (cur / "1.m").write_bytes(b"x" * 1000 * (n + 1))
        os.utime(config.mailboxes_path / addr / "password", (86400 * (10 + n),) * 2)
    rows: list = []
    stats = scan_mailboxes(config.mailboxes_path, index=rows)
    write_index(rows, stats.scanned_at, index)
    server = serve_adminctl(config, sock)
    with TestClient(create_app(settings, config)) as client:
        yield client, config, addrs, settings
    server.close()


def test_list_sort_filter_page(relay):
    client, _, addrs, _ = relay
    assert client.get("/accounts").status_code == 401
    page = client.get("/accounts", headers=MONITOR).json()
    assert [a["address"] for a in page["accounts"]] == addrs and page["total"] == 3
    assert "password" not in json.dumps(page)
    by_login = client.get("/accounts?sort=last_login", headers=MONITOR).json()["accounts"]
    assert [a["address"] for a in by_login] == addrs[::-1]
    by_size = client.get("/accounts?sort=size&limit=1&offset=1", headers=MONITOR).json()
    assert [a["address"] for a in by_size["accounts"]] == [addrs[1]] and by_size["total"] == 3
    prefix = client.get("/accounts?prefix=user00002", headers=MONITOR).json()
    assert [a["address"] for a in prefix["accounts"]] == [addrs[1]]
    assert client.get("/accounts?limit=0", headers=MONITOR).status_code == 422


def test_detail_block_unblock_delete_audited(relay):
    client, config, addrs, settings = relay
    addr = addrs[0]
    info = client.get(f"/accounts/{addr}", headers=MONITOR).json()
    assert info["exists"] and info["messages"] == 1 and info["enforce_e2ee"]
    assert info["blocked"] is None and info["push_token"] is False
    assert client.post(f"/accounts/{addr}/block", headers=MONITOR).status_code == 403

    resp = client.post(f"/accounts/{addr}/block", headers=ADMIN, json={"reason": "spam"})
    assert resp.json() == {"changed": True}
    assert client.get(f"/accounts/{addr}", headers=MONITOR).json()["blocked"]["reason"] == "spam"
    listed = client.get("/accounts", headers=MONITOR).json()["accounts"]
    assert [a["blocked"] for a in listed] == [True, False, False]
    assert client.post(f"/accounts/{addr}/unblock", headers=ADMIN).json() == {"changed": True}

    assert client.delete(f"/accounts/{addr}?reason=abuse", headers=ADMIN).json() == {
        "changed": True
    }
    assert not (config.mailboxes_path / addr).exists()
    gone = client.get(f"/accounts/{addr}", headers=MONITOR).json()
    assert gone["exists"] is False and gone["blocked"]["deleted"] is True
    assert addr not in [
        a["address"] for a in client.get("/accounts", headers=MONITOR).json()["accounts"]
    ]
    assert not authenticate_or_create(config, addr, "password-123").ok

    audit = [json.loads(line) for line in settings.audit_log_path.read_text().splitlines()]
    assert [(e["action"], e["address"], e["by"]) for e in audit] == [
        ("block", addr, "alice"),
        ("unblock", addr, "alice"),
        ("delete", addr, "alice"),
    ]


def test_unknown_account_is_404(relay):
    client = relay[0]
    assert client.get(f"/accounts/nobody000@{DOMAIN}", headers=MONITOR).status_code == 404
    assert client.delete(f"/accounts/nobody000@{DOMAIN}", headers=ADMIN).status_code == 404


def test_without_helper_503(client):
    resp = client.get(f"/accounts/user00001@{DOMAIN}", headers=MONITOR)
    assert resp.status_code == 503 and "helper" in resp.json()["detail"]
    assert client.get("/queue", headers=MONITOR).status_code == 503
    assert client.delete("/queue/ABCDEF123", headers=ADMIN).status_code == 503
    assert client.delete("/queue/..%2F..", headers=ADMIN).status_code in (404, 422)


def _tree(root: Path, mailboxes: Path) -> dict:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == mailboxes or mailboxes in here.parents:
            continue
        for name in dirnames + filenames:
            if name.endswith(".sock"):
                continue
            path = here / name
            found[str(path)] = path.lstat().st_mtime_ns
    return found


ADDRESSES = st.one_of(
    st.text(max_size=300),
    st.sampled_from(
        ["../x", f"../x@{DOMAIN}", f"..@{DOMAIN}", f"a\0b@{DOMAIN}", f"a/b@{DOMAIN}",
         "x" * 10_000, f"ünï@{DOMAIN}", f"%2e%2e@{DOMAIN}", f"user00001@{DOMAIN}/../x"]
    ),
    st.text(max_size=30).map(lambda s: f"{s}@{DOMAIN}"),
)  # fmt: skip
ROUTES = [
    ("GET", "/accounts/{}", MONITOR),
    ("DELETE", "/accounts/{}", ADMIN),
    ("POST", "/accounts/{}/block", ADMIN),
    ("POST", "/accounts/{}/unblock", ADMIN),
]


@pytest.mark.parametrize(("method", "route", "headers"), ROUTES, ids=lambda r: str(r)[:20])
def test_any_address_string_is_404_or_422(relay, tmp_path, method, route, headers):
    client, config, addrs, _ = relay
    existing = set(addrs)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ADDRESSES)
    def check(addr):
        url = route.format(quote(addr, safe=""))
        if addr in existing or httpx.URL(f"http://t{url}").path.rstrip("/") == "/accounts":
            return  # "", "/", "." make the listing's URL, not an {address} route
        before = _tree(tmp_path, config.mailboxes_path)
        resp = client.request(method, url, headers=headers)
        assert resp.status_code in (404, 422), (addr, resp.status_code, resp.text)
        assert _tree(tmp_path, config.mailboxes_path) == before
        assert sorted(p.name for p in config.mailboxes_path.iterdir()) == sorted(existing)

    check()
