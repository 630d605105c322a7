"""Who the caller is: the peer, or the client our own nginx forwarded (api/deps.py).

nginx on the relay passes the client's address in X-Forwarded-For (it learns it from the
443 switch's PROXY header). A request that carries it came through the proxy: it is never
local, whatever address it names, so /health and the allow list never treat a web client
as the relay's own monitoring, and a forged header only ever loses privileges.
"""

from __future__ import annotations

import httpx
import pytest
from api_support import MONITOR
from chatmail_api.deps import client_address, is_local
from starlette.requests import Request


def request(peer: str, headers: dict[str, str]) -> Request:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/health",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": (peer, 40000),
    }
    return Request(scope)


XFF = "X-Forwarded-For"


@pytest.mark.parametrize(
    ("peer", "headers", "client", "local"),
    [
        ("127.0.0.1", {}, "127.0.0.1", True),
        ("::1", {}, "::1", True),
        ("127.0.0.1", {XFF: "198.51.100.7"}, "198.51.100.7", False),
        # nginx forwarding a client on the relay itself (or, without the PROXY header,
        # every client of the 443 switch): proxied, so not local
        ("127.0.0.1", {XFF: "127.0.0.1"}, "127.0.0.1", False),
        ("127.0.0.1", {XFF: "::1"}, "::1", False),
        ("127.0.0.1", {"X-Real-IP": "127.0.0.1"}, "127.0.0.1", False),
        # left of our proxy's entry is what the client wrote: never believed
        ("127.0.0.1", {XFF: "127.0.0.1, 203.0.113.5"}, "203.0.113.5", False),
        ("127.0.0.1", {XFF: "garbage"}, "127.0.0.1", False),
        ("127.0.0.1", {XFF: ""}, "127.0.0.1", False),
        # a peer that is not our proxy: its header is ignored, and it is remote anyway
        ("192.0.2.1", {XFF: "127.0.0.1"}, "192.0.2.1", False),
    ],
    ids=["loopback", "loopback6", "forwarded", "forwarded-loopback", "forwarded-loopback6",
         "real-ip-loopback", "forged-left", "garbage", "empty", "untrusted-peer"],
)  # fmt: skip
def test_client_and_locality(api_settings, peer, headers, client, local):
    settings, _ = api_settings()
    assert client_address(request(peer, headers), settings) == client
    assert is_local(request(peer, headers)) is local


def test_health_through_the_proxy_is_not_local(live_api):
    """nginx forwarding a loopback client is still the proxy: /health wants a token."""
    url = live_api()
    assert httpx.get(f"{url}/health").status_code == 200
    forwarded = {XFF: "127.0.0.1"}
    assert httpx.get(f"{url}/health", headers=forwarded).status_code == 401
    assert httpx.get(f"{url}/health", headers={**forwarded, **MONITOR}).status_code == 200


def test_allow_list_does_not_admit_proxied_loopback(live_api):
    url = live_api(allow=["198.51.100.0/24"])
    assert httpx.get(f"{url}/status", headers=MONITOR).status_code == 200  # local
    forwarded = {XFF: "127.0.0.1", **MONITOR}
    assert httpx.get(f"{url}/status", headers=forwarded).status_code == 403
