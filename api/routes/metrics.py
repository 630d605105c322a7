"""``GET /metrics``: Prometheus text exposition from the relay collector."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..deps import MonitorAuth, RuntimeDep
from ..models import AUTH_RESPONSES

router = APIRouter(tags=["metrics"], responses=AUTH_RESPONSES)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Exposition"}},
)
async def metrics(request: Request, rt: RuntimeDep, _: MonitorAuth) -> Response:
    await rt.status()  # refresh the snapshot the collector reads, if stale
    if rt.settings.account_stats_file is not None:
        await rt.read_account_stats()
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)
