"""salt/chatmail/upstream: what upstream's cmdeploy left on a relay is removed, from one list.

The states are rendered here; tests/adopt applies them to a container that looks like an
upstream relay, and tests/e2e shows them to be no-ops on a relay that never had one.
"""

from __future__ import annotations

import pytest
import yaml
from saltsupport import PILLARS, REPO
from test_openbsd import OPENBSD_GRAINS

LEFTOVERS = yaml.safe_load((REPO / "salt/chatmail/upstream/leftovers.yaml").read_text())

#: Units this formula runs under upstream's names: they must never be on the list.
OURS = {
    "doveauth.service",
    "chatmail-metadata.service",
    "lastlogin.service",
    "filtermail.service",
    "filtermail-incoming.service",
    "chatmail-expire.service",
    "chatmail-expire.timer",
    # the TURN server of this formula (coturn's Debian unit)
    "coturn.service",
}


def test_list_spares_what_the_formula_runs():
    assert not set(LEFTOVERS["units"]) & OURS
    assert len(set(LEFTOVERS["units"])) == len(LEFTOVERS["units"])
    assert all(p.startswith("/") for p in LEFTOVERS["paths"])


@pytest.mark.parametrize("platform", ["debian12", "debian13"])
def test_every_leftover_has_its_states(render, platform):
    states = render(platform, "example").states
    for unit in LEFTOVERS["units"]:
        body = states[f"chatmail-upstream-unit-{unit}"]
        dead = {k: v for item in body["service"] if isinstance(item, dict) for k, v in item.items()}
        # stopped and disabled only where upstream installed it: a dry run elsewhere is quiet
        assert dead["enable"] is False
        assert dead["onlyif"] == f"test -e /etc/systemd/system/{unit}"
        assert "absent" in body["file"]
    for path in LEFTOVERS["paths"]:
        assert "absent" in states[f"chatmail-upstream-path-{path}"]["file"]
    pkgs = states["chatmail-upstream-packages"]["pkg"]
    assert {"pkgs": LEFTOVERS["packages"]} in pkgs
    venv = states["chatmail-upstream-venv"]["file"]
    assert {"require_in": [{"cmd": "chatmail-chatmaild-venv-create"}]} in venv


def test_openbsd_has_none(render):
    pillar = PILLARS["example"]()
    states = render("openbsd7", "example", pillar=pillar, grains=OPENBSD_GRAINS).states
    assert not [s for s in states if s.startswith("chatmail-upstream-")]
