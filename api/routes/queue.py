"""``/queue``: the MTA's queue (Postfix or OpenSMTPD) through chatmail-adminctl (root)."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path

from chatmaild.mailqueue import QUEUE_ID_RE

from ..accountcreation import append_audit
from ..adminctl import call
from ..deps import AdminAuth, MonitorAuth, RuntimeDep
from ..models import AUTH_RESPONSES, Done, ErrorBody, QueueListing, QueueMessage

router = APIRouter(
    prefix="/queue",
    tags=["queue"],
    responses={
        **AUTH_RESPONSES,
        503: {"model": ErrorBody, "description": "The privileged helper is unavailable"},
    },
)


@router.get("", response_model=QueueListing)
async def get_queue(rt: RuntimeDep, _: MonitorAuth) -> QueueListing:
    """Every queued message: id, age, size, recipient domains (no addresses), last error."""
    entries = await call(rt.settings.queue_socket, "list", {}, rt.settings.admin_timeout_s)
    now = time.time()
    return QueueListing(
        messages=[
            QueueMessage(
                id=e["id"],
                age_s=max(0, int(now - e["arrival"])),
                size=e["size"],
                recipient_domains=e["recipient_domains"],
                last_error=e["last_error"],
            )
            for e in entries
        ]
    )


@router.post("/flush", response_model=Done)
async def flush_queue(rt: RuntimeDep, caller: AdminAuth) -> Done:
    """Try every deferred message now."""
    await call(rt.settings.queue_socket, "flush", {}, rt.settings.admin_timeout_s)
    append_audit(rt.settings.audit_log_path, "queue-flush", caller.name, caller.client)
    return Done(changed=True)


@router.delete(
    "/{queue_id}",
    response_model=Done,
    responses={404: {"model": ErrorBody, "description": "No such message"}},
)
async def delete_queued(
    queue_id: Annotated[str, Path(max_length=32)], rt: RuntimeDep, caller: AdminAuth
) -> Done:
    """Delete one message from the queue (no bounce is sent)."""
    if not QUEUE_ID_RE.fullmatch(queue_id):
        raise HTTPException(422, "queue_id: 6 to 32 letters and digits")
    result = await call(
        rt.settings.queue_socket, "delete", {"id": queue_id}, rt.settings.admin_timeout_s
    )
    if not result["deleted"]:
        raise HTTPException(404, f"no message {queue_id} in the queue")
    append_audit(
        rt.settings.audit_log_path, "queue-delete", caller.name, caller.client, id=queue_id
    )
    return Done(changed=True)
