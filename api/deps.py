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


def client_address(request: Request, settings: Settings) -> str:
    """The peer, or the address our own proxy (nginx) appended to X-Forwarded-For.

    Only the rightmost untrusted X-Forwarded-For entry counts: anything left of it was
    written by the client and can be forged.
    """
    peer = request.client.host if request.client else ""
    try:
        trusted = ipaddress.ip_address(peer) in settings.trusted_proxies
    except ValueError:
        trusted = False
    forwarded = request.headers.get("x-forwarded-for")
    if not trusted or not forwarded:
        return peer
    for hop in reversed([h.strip() for h in forwarded.split(",")]):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return peer  # garbage from the proxy chain: fall back to the peer
        if address not in settings.trusted_proxies:
            return str(address)
    return peer


def get_client(request: Request, settings: SettingsDep) -> str:
    return client_address(request, settings)


ClientDep = Annotated[str, Depends(get_client)]


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
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Caller:
        address = _address(client)
        allowed = address is not None and (
            address.is_loopback or any(address in net for net in settings.allow)
        )
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
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """/health is open to loopback (local monitoring) or to all with ``public_health``."""
    address = _address(client)
    if settings.public_health or (address is not None and address.is_loopback):
        return
    _require("monitor")(settings, client, credentials)


HealthAccess = Annotated[None, Depends(_health_access)]
