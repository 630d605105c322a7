"""``GET /dns`` (every record checked at the authoritative servers) and ``/dns/zone``."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ..deps import MonitorAuth, RuntimeDep
from ..dnscheck import build_zone
from ..models import AUTH_RESPONSES, DnsReport

router = APIRouter(prefix="/dns", tags=["dns"], responses=AUTH_RESPONSES)


@router.get("", response_model=DnsReport)
async def dns(rt: RuntimeDep, _: MonitorAuth) -> DnsReport:
    """All problems at once: required records, recommendations, the MTA-STS policy."""
    return await rt.check_dns()


@router.get(
    "/zone",
    response_class=Response,
    responses={200: {"content": {"text/dns": {}}, "description": "BIND zone lines"}},
)
async def zone(rt: RuntimeDep, _: MonitorAuth) -> Response:
    """The records to set at the DNS provider, in BIND zone file format."""
    text = await build_zone(rt.settings, rt.config)
    return Response(text, media_type="text/dns")
