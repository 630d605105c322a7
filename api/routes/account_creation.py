"""``/account-creation``: open or close registration through the nocreate file."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException

from ..accountcreation import CreationState, CreationStateError
from ..deps import AdminAuth, MonitorAuth, RuntimeDep
from ..models import AUTH_RESPONSES, AccountCreation, AccountCreationUpdate, ErrorBody
from ..runtime import Runtime

router = APIRouter(prefix="/account-creation", tags=["account-creation"], responses=AUTH_RESPONSES)


def _when(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


def _describe(rt: Runtime, state: CreationState, system_limit: str | None) -> AccountCreation:
    return AccountCreation(
        enabled=not state.closed and system_limit is None,
        closed_by_file=state.closed,
        reason=state.reason,
        by=state.by,
        since=_when(state.since),
        until=_when(state.until),
        pinned=rt.settings.account_creation_pin,
        system_limit=system_limit,
        nocreate_file=str(rt.config.nocreate_file),
    )


@router.get("", response_model=AccountCreation)
async def get_account_creation(rt: RuntimeDep, _: MonitorAuth) -> AccountCreation:
    state = await rt.creation_state()
    limit = None if state.closed else await asyncio.to_thread(rt.creation.system_limit)
    return _describe(rt, state, limit)


@router.put(
    "",
    response_model=AccountCreation,
    responses={
        409: {"model": ErrorBody, "description": "Pinned by the pillar"},
        503: {"model": ErrorBody, "description": "The nocreate file cannot be written"},
    },
)
async def put_account_creation(
    body: AccountCreationUpdate, rt: RuntimeDep, caller: AdminAuth
) -> AccountCreation:
    """Open (``enabled: true``) or close registration; idempotent; audited."""
    pin = rt.settings.account_creation_pin
    if pin is not None:
        raise HTTPException(
            409,
            f"account creation is pinned {'open' if pin else 'closed'} by the pillar "
            "(chatmail:api:account_creation_pin); change it there and re-apply salt",
        )
    until = None
    if body.until is not None:
        if body.enabled:
            raise HTTPException(422, "until only applies when closing (enabled: false)")
        if body.until.tzinfo is None:
            raise HTTPException(422, "until needs a time zone, e.g. 2030-01-01T00:00:00Z")
        until = body.until.timestamp()
        if until <= time.time():
            raise HTTPException(422, "until is in the past")
    async with rt.creation_lock:
        try:
            state, changed = await asyncio.to_thread(
                rt.creation.set, body.enabled, body.reason, until, caller.name, caller.client
            )
        except CreationStateError as exc:
            raise HTTPException(503, str(exc)) from None
    if changed:
        rt.invalidate_status()
    limit = None if state.closed else await asyncio.to_thread(rt.creation.system_limit)
    return _describe(rt, state, limit)
