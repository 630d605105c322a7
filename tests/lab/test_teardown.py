"""What a killed lab leaves behind is removed from its state file alone (no lab booted)."""

from __future__ import annotations

import json
import subprocess

import lab as labctl
import pytest

pytestmark = pytest.mark.container  # changes the host's network: root, like the lab


def exists(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def test_teardown_removes_the_recorded_bridge_rules_trees_and_state_file(tmp_path):
    bridge, table, netns = "cmlabtest0", "chatmail_lab_test", "cmlab-test-client"
    subprocess.run(["ip", "link", "add", bridge, "type", "bridge"], check=True)
    subprocess.run(["nft", "add", "table", "ip", table], check=True)
    subprocess.run(["ip", "netns", "add", netns], check=True)
    netns_etc = tmp_path / "netns-etc"
    netns_etc.mkdir()
    (netns_etc / "resolv.conf").write_text("nameserver 198.18.0.2\n")
    source = tmp_path / "src"
    (source / "chatmaild").mkdir(parents=True)
    (source / "chatmaild" / "x.py").write_text("")
    state = {"owner": 1, "hosts": {}, "bridge": bridge, "nft_table": table, "source": str(source)}
    state |= {"netns": netns, "netns_etc": str(netns_etc)}
    state_file = tmp_path / "lab.json"
    state_file.write_text(json.dumps(state))
    try:
        labctl.teardown(json.loads(state_file.read_text()), state_file)
        assert not exists(["ip", "link", "show", bridge])
        assert not exists(["nft", "list", "table", "ip", table])
        assert not source.exists()
        assert not exists(["ip", "netns", "exec", netns, "true"])
        assert not netns_etc.exists()
        assert not state_file.exists()
        labctl.teardown(state, state_file)  # again: nothing left is no error
    finally:
        subprocess.run(["ip", "link", "delete", bridge], capture_output=True, check=False)
        subprocess.run(["nft", "delete", "table", "ip", table], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "delete", netns], capture_output=True, check=False)
