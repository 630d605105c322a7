"""/metrics exports the relay-to-relay delivery counters of chatmail-mxtransport (outbound,
per channel and result) and chatmail-mxdeliv (POST /mxdeliv requests, per result)."""

from __future__ import annotations

from api_support import MONITOR
from chatmail_api.app import create_app
from fastapi.testclient import TestClient
from test_metrics import samples

from chatmaild.counters import Counters


def test_delivery_channel_counters(api_settings):
    settings, config = api_settings()
    transport = Counters(config.counters_dir, "mxtransport")
    transport.inc("outbound_deliveries_total", amount=3, channel="https", result="accepted")
    transport.inc("outbound_deliveries_total", channel="https", result="failed")
    transport.inc("outbound_deliveries_total", channel="smtp", result="accepted")
    transport.flush()
    listener = Counters(config.counters_dir, "mxdeliv")
    listener.inc("mxdeliv_received_total", amount=2, result="refused")
    listener.flush()
    with TestClient(create_app(settings, config)) as client:
        got = samples(client.get("/metrics", headers=MONITOR).text)
    name = "chatmail_outbound_deliveries_total"
    assert got[(name, (("channel", "https"), ("result", "accepted")))] == 3
    assert got[(name, (("channel", "https"), ("result", "failed")))] == 1
    assert got[(name, (("channel", "smtp"), ("result", "accepted")))] == 1
    assert got[("chatmail_mxdeliv_received_total", (("result", "refused"),))] == 2
