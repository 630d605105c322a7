"""``POST /probe``: send a message through the relay to itself now."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException

from ..deps import AdminAuth, RuntimeDep
from ..models import AUTH_RESPONSES, ErrorBody, ProbeResult

router = APIRouter(tags=["probe"], responses=AUTH_RESPONSES)


@router.post(
    "/probe",
    response_model=ProbeResult,
    responses={409: {"model": ErrorBody, "description": "The probe is disabled"}},
)
async def probe(rt: RuntimeDep, _: AdminAuth) -> ProbeResult:
    """Submit on 587, read back over IMAPS 993; the result also feeds /status and /metrics."""
    if not rt.settings.probe.enabled:
        raise HTTPException(409, "the probe is disabled in the API settings (probe.enabled)")
    return await rt.run_probe()
