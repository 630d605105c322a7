"""``/new``: public credential proposals for Delta Chat (replaces upstream's newemail CGI).

Like upstream, nothing is created here: the account comes into existence at its first
login (doveauth). We refuse early while creation is closed, so clients get a reason
instead of a failing login.
"""

from __future__ import annotations

import asyncio
import math

from fastapi import APIRouter, HTTPException
from fastapi.responses import RedirectResponse

from chatmaild.newcreds import create_credentials

from ..deps import ClientDep, RuntimeDep
from ..models import ErrorBody, NewCredentials
from ..runtime import Runtime

router = APIRouter(tags=["new"])

REFUSALS = {
    403: {"model": ErrorBody, "description": "Account creation is closed by the operator"},
    429: {"model": ErrorBody, "description": "Too many requests from this address"},
    503: {"model": ErrorBody, "description": "A system limit refuses new accounts now"},
}


async def _propose(rt: Runtime, client: str) -> NewCredentials:
    wait = rt.rate_limiter.allow(client)
    if wait:
        raise HTTPException(
            429,
            "too many requests, try again later",
            headers={"Retry-After": str(max(1, math.ceil(wait)))},
        )
    state = await rt.creation_state()
    if state.closed:
        raise HTTPException(403, f"account creation is closed: {state.reason or 'by the operator'}")
    limit = await asyncio.to_thread(rt.creation.system_limit)
    if limit:
        raise HTTPException(
            503,
            "account creation is paused while the relay is short of resources",
            headers={"Retry-After": "300"},
        )
    creds = create_credentials(rt.config)
    return NewCredentials(email=creds.email, password=creds.password, dclogin_url=creds.dclogin_url)


@router.post("/new", response_model=NewCredentials, responses=REFUSALS)
async def new_account(rt: RuntimeDep, client: ClientDep) -> NewCredentials:
    """Fresh credentials; the account is created by the first login with them."""
    return await _propose(rt, client)


@router.get(
    "/new",
    response_model=NewCredentials,
    responses={301: {"description": "dcaccount: link for Delta Chat"}, **REFUSALS},
)
async def new_account_link(rt: RuntimeDep, client: ClientDep):
    """Self-signed relays answer like POST; others redirect to ``dcaccount:`` as upstream."""
    if rt.config.tls_cert_mode != "self":
        return RedirectResponse(f"dcaccount:https://{rt.config.mail_domain}/new", 301)
    return await _propose(rt, client)
