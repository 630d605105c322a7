"""``GET /status``: every check with its state, severity, hint and since."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import MonitorAuth, RuntimeDep
from ..models import AUTH_RESPONSES, Status

router = APIRouter(tags=["status"], responses=AUTH_RESPONSES)


@router.get("/status", response_model=Status)
async def status(rt: RuntimeDep, _: MonitorAuth) -> Status:
    """Overall ``ok|degraded|down`` plus each check (cached for ``status_cache_s``)."""
    return (await rt.status()).status
