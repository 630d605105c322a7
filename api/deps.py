"""Dependencies the handlers declare: ``def handler(rt: RuntimeDep, caller: AdminAuth)``."""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from .runtime import Runtime
from .settings import Settings

bearer = HTTPBearer(auto_error=False, description="A monitor or admin token")


def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_settings(runtime: RuntimeDep) -> Settings:
    return runtime.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


#: Headers a proxy adds: a request carrying one came through a proxy.
PROXY_HEADERS = ("x-forwarded-for", "x-real-ip")


def _peer(request: Request) -> str:
    return request.client.host if request.client else ""


def client_address(request: Request, settings: Settings) -> str:
    """The peer, or the address our own proxy (nginx) put into X-Forwarded-For.

    Only the rightmost untrusted X-Forwarded-For entry counts: anything left of it was
    written by the client and can be forged. If every entry is a proxy of ours, the
    leftmost is the client (nginx forwarding a client on the relay itself).
    """
    peer = _peer(request)
    try:
        trusted = ipaddress.ip_address(peer) in settings.trusted_proxies
    except ValueError:
        trusted = False
    forwarded = request.headers.get("x-forwarded-for")
    if not trusted or not forwarded:
        return peer
    hops = []
    for hop in [h.strip() for h in forwarded.split(",")]:
        try:
            hops.append(ipaddress.ip_address(hop))
        except ValueError:
            return peer  # garbage from the proxy chain: fall back to the peer
    for address in reversed(hops):
        if address not in settings.trusted_proxies:
            return str(address)
    return str(hops[0])


def is_local(request: Request) -> bool:
    """A loopback peer that no proxy forwarded: the relay's own monitoring or admin.

    Anything that came through a proxy (X-Forwarded-For or X-Real-IP present, even
    empty or naming a loopback address) is remote: nginx forwards web clients, and with
    the 443 switch a web client may well be 127.0.0.1. A forged header only loses
    privileges.
    """
    if any(name in request.headers for name in PROXY_HEADERS):
        return False
    address = _address(_peer(request))
    return address is not None and address.is_loopback


def get_client(request: Request, settings: SettingsDep) -> str:
    return client_address(request, settings)


ClientDep = Annotated[str, Depends(get_client)]


LocalDep = Annotated[bool, Depends(is_local)]


@dataclass(frozen=True)
class Caller:
    name: str  # the token's name from api.json, for the audit log
    scope: str  # "monitor" or "admin"
    client: str


def _match_token(settings: Settings, given: str) -> tuple[str, str] | None:
    """(scope, name) of the token equal to ``given``; compares against every token."""
    found = None
    given_bytes = given.encode()
    for scope in ("admin", "monitor"):
        for name, token in getattr(settings.tokens, scope).items():
            if secrets.compare_digest(token.encode(), given_bytes) and found is None:
                found = (scope, name)
    return found


def _address(client: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(client)
    except ValueError:
        return None


def _require(scope: str):
    def check(
        settings: SettingsDep,
        client: ClientDep,
        local: LocalDep,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Caller:
        address = _address(client)
        allowed = local or (address is not None and any(address in net for net in settings.allow))
        if settings.allow and not allowed:
            raise HTTPException(403, f"client address {client} is not allowed")
        if credentials is None:
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        match = _match_token(settings, credentials.credentials)
        if match is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        token_scope, name = match
        if scope == "admin" and token_scope != "admin":
            raise HTTPException(403, f"token {name!r} has scope monitor; this needs admin")
        return Caller(name=name, scope=token_scope, client=client)

    return check


MonitorAuth = Annotated[Caller, Depends(_require("monitor"))]
AdminAuth = Annotated[Caller, Depends(_require("admin"))]


def _health_access(
    settings: SettingsDep,
    client: ClientDep,
    local: LocalDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """/health is open to local callers (monitoring on the relay) or to all with
    ``public_health``; never to a client our proxy forwarded."""
    if settings.public_health or local:
        return
    _require("monitor")(settings, client, local, credentials)


HealthAccess = Annotated[None, Depends(_health_access)]
