"""``GET /health``: unauthenticated, answered from the cached status run."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import HealthAccess, RuntimeDep
from ..models import AUTH_RESPONSES, Health

router = APIRouter(tags=["health"])


@router.get(
    "/health",
    response_model=Health,
    response_model_exclude_none=True,
    responses={
        **AUTH_RESPONSES,
        503: {"model": Health, "description": "A critical check fails"},
    },
)
async def health(rt: RuntimeDep, _: HealthAccess):
    """200 ``{"status": "ok"}``, or 503 with the first failing critical check.

    No token needed from loopback, or from anywhere with ``public_health``."""
    snapshot = await rt.status()
    failing = [r for r in snapshot.results if r.state == "fail" and r.severity == "critical"]
    if failing:
        body = Health(status="down", reason=f"{failing[0].id}: {failing[0].summary}"[:200])
        return JSONResponse(body.model_dump(), status_code=503)
    return Health(status="ok")
