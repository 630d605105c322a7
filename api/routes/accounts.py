"""``/accounts``: list, inspect, block, unblock and delete accounts.

Reads need a monitor token, changes an admin token; every change is audited. The list
comes from the account index (scanned as the mailbox owner every few minutes), the rest
from ``chatmail-adminctl`` (chatmaild.accountadmin) live. No reply carries a password.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Path, Query

from chatmaild.accountadmin import AddressError, account_user
from chatmaild.blocklist import BlocklistError

from ..accountcreation import append_audit
from ..adminctl import call
from ..deps import AdminAuth, Caller, MonitorAuth, RuntimeDep
from ..models import (
    AUTH_RESPONSES,
    AccountAction,
    AccountDetail,
    AccountPage,
    AccountSummary,
    Done,
    ErrorBody,
)
from ..runtime import Runtime

router = APIRouter(
    prefix="/accounts",
    tags=["accounts"],
    responses={
        **AUTH_RESPONSES,
        404: {"model": ErrorBody, "description": "No such account"},
        503: {"model": ErrorBody, "description": "The privileged helper is unavailable"},
    },
)

AddressPath = Annotated[str, Path(max_length=254, description="user@mail_domain")]


def _when(ts: float | None) -> datetime | None:
    return datetime.fromtimestamp(ts, UTC) if ts is not None else None


def _validated(rt: Runtime, address: str) -> str:
    try:
        account_user(rt.config, address)
    except AddressError as exc:
        raise HTTPException(422, f"address: {exc}") from None
    return address


async def _accounts(rt: Runtime, op: str, address: str, caller: Caller | None, **args) -> dict:
    args = {"address": _validated(rt, address), **args}
    if caller is not None:
        args["by"] = caller.name
    return await call(rt.settings.accounts_socket, op, args, rt.settings.admin_timeout_s)


def _audit(rt: Runtime, action: str, caller: Caller, address: str, **fields) -> None:
    append_audit(
        rt.settings.audit_log_path, action, caller.name, caller.client, address=address, **fields
    )


@router.get("", response_model=AccountPage)
async def list_accounts(
    rt: RuntimeDep,
    _: MonitorAuth,
    prefix: Annotated[str, Query(max_length=254)] = "",
    sort: Literal["address", "last_login", "size"] = "address",
    offset: Annotated[int, Query(ge=0, le=100_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AccountPage:
    """A page of accounts: by address, most recent login first, or largest first."""
    index = await asyncio.to_thread(rt.account_index.get)
    if index is None:
        return AccountPage(accounts=[], total=0, offset=offset, limit=limit)
    try:
        blocked = rt.blocklist.entries()
    except BlocklistError as exc:
        raise HTTPException(503, str(exc)) from None
    rows = index.select(prefix, sort)
    if blocked:
        rows = [r for r in rows if not blocked.get(r[0], {}).get("deleted")]
    page = [
        AccountSummary(
            address=r[0],
            last_login=_when(r[1]),
            storage_bytes=r[2],
            messages=r[3],
            blocked=r[0] in blocked,
        )
        for r in rows[offset : offset + limit]
    ]
    return AccountPage(
        accounts=page,
        total=len(rows),
        offset=offset,
        limit=limit,
        indexed_at=_when(index.scanned_at),
    )


@router.get("/{address}", response_model=AccountDetail)
async def get_account(address: AddressPath, rt: RuntimeDep, _: MonitorAuth) -> AccountDetail:
    """Created, last login, storage against quota, messages, E2EE, push, block."""
    info = await _accounts(rt, "info", address, None)
    for key in ("created", "last_login"):
        info[key] = _when(info[key])
    if info["blocked"] is not None:
        info["blocked"]["since"] = _when(info["blocked"]["since"])
    return AccountDetail.model_validate(info)


@router.post("/{address}/block", response_model=Done)
async def block_account(
    address: AddressPath, rt: RuntimeDep, caller: AdminAuth, body: AccountAction | None = None
) -> Done:
    """Refuse the account's logins (IMAP, SMTP) and incoming mail; its data stays."""
    reason = body.reason if body else ""
    result = await _accounts(rt, "block", address, caller, reason=reason)
    if result["changed"]:
        _audit(rt, "block", caller, address, reason=reason)
    return Done(changed=result["changed"])


@router.post("/{address}/unblock", response_model=Done)
async def unblock_account(address: AddressPath, rt: RuntimeDep, caller: AdminAuth) -> Done:
    """Lift a block; after a delete, the address may be created again by a login."""
    result = await _accounts(rt, "unblock", address, caller)
    if result["changed"]:
        _audit(rt, "unblock", caller, address)
    return Done(changed=result["changed"])


@router.delete("/{address}", response_model=Done)
async def delete_account(
    address: AddressPath,
    rt: RuntimeDep,
    caller: AdminAuth,
    reason: Annotated[str, Query(max_length=500)] = "",
) -> Done:
    """Remove the mailbox and its data; the address stays blocked (no re-creation)."""
    result = await _accounts(rt, "delete", address, caller, reason=reason)
    _audit(rt, "delete", caller, address, reason=reason, mailbox_removed=result["mailbox_removed"])
    rt.invalidate_status()
    return Done(changed=result["mailbox_removed"])
