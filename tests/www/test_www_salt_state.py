"""salt/chatmail/www/init.sls: rendered with Jinja like Salt does, and its commands run.

The container tests apply the whole formula with Salt; this checks the state's own logic
quickly: which states exist for which keys, and that the rendered command builds, is
idempotent under Salt's stateful protocol, and cleans up when the pages are disabled.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import yaml
from chatmail_www.build import MANIFEST

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent


def render_state(chatmail: dict) -> dict:
    """The state's YAML, with map.jinja replaced by the given merged map."""
    loader = jinja2.ChoiceLoader(
        [
            jinja2.DictLoader({"chatmail/map.jinja": "{%- set chatmail = merged_map %}"}),
            jinja2.FileSystemLoader(REPO / "salt"),
        ]
    )
    # Salt's defaults: no trim_blocks, no lstrip_blocks.
    environment = jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined)
    text = environment.get_template("chatmail/www/init.sls").render(merged_map=chatmail)
    states = yaml.safe_load(text) or {}
    assert states.pop("include") == ["chatmail.chatmaild"]  # so it can be applied alone
    return states


@pytest.fixture
def merged_map(tmp_path, make_config):
    make_config("chat.example.org")
    return {
        "paths": {
            "venv": str(VENV),
            "ini": str(tmp_path / "chatmail.ini"),
            "www_root": str(tmp_path / "html"),
        },
        "www": {"enabled": True, "source": "", "source_dir": str(tmp_path / "www-src")},
    }


def run_stateful(command: str) -> dict:
    done = subprocess.run(shlex.split(command), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)  # Salt reads the whole stdout as one JSON object


def state_args(state: dict, function: str) -> dict:
    merged = {}
    for item in state[function]:
        merged.update(item)
    return merged


def test_default_build_state_is_idempotent(merged_map, tmp_path):
    states = render_state(merged_map)
    assert list(states) == ["chatmail-www-build"]
    build = state_args(states["chatmail-www-build"], "cmd.run")
    assert build["stateful"] is True
    assert build["require"] == [
        {"cmd": "chatmail-chatmaild-venv"},
        {"file": "chatmail-chatmaild-ini"},
    ]
    assert "--src" not in build["name"]

    first = run_stateful(build["name"])
    assert first["changed"] is True and "index.html" in first["written"]
    assert (tmp_path / "html" / "index.html").is_file()
    assert run_stateful(build["name"]) == {
        "changed": False,
        "comment": f"{tmp_path / 'html'} is up to date",
        "written": [],
        "removed": [],
    }


def test_local_source_folder(merged_map, tmp_path):
    source = tmp_path / "mine"
    source.mkdir()
    (source / "index.md").write_text("# Our relay {{ domain }}\n")
    merged_map["www"]["source"] = str(source)
    build = state_args(render_state(merged_map)["chatmail-www-build"], "cmd.run")
    assert f"--src {source} " in build["name"]
    run_stateful(build["name"])
    assert "Our relay chat.example.org" in (tmp_path / "html" / "index.html").read_text()


def test_salt_url_source_is_copied_first(merged_map):
    merged_map["www"]["source"] = "salt://site/www"
    states = render_state(merged_map)
    copy = state_args(states["chatmail-www-source"], "file.recurse")
    assert copy["name"] == merged_map["www"]["source_dir"]
    assert copy["source"] == "salt://site/www" and copy["clean"] is True
    assert copy["require_in"] == [{"cmd": "chatmail-www-build"}]
    build = state_args(states["chatmail-www-build"], "cmd.run")
    assert f"--src {merged_map['www']['source_dir']} " in build["name"]


def test_disabled_pages_are_removed(merged_map, tmp_path):
    run_stateful(state_args(render_state(merged_map)["chatmail-www-build"], "cmd.run")["name"])
    (tmp_path / "html" / "operator-note.txt").write_text("not ours")
    merged_map["www"]["enabled"] = False
    states = render_state(merged_map)
    assert list(states) == ["chatmail-www-clean"]
    clean = state_args(states["chatmail-www-clean"], "cmd.run")
    assert clean["onlyif"] == f"test -x {VENV}/bin/chatmail-www"
    result = run_stateful(clean["name"])
    assert result["changed"] is True and "privacy.html" in result["removed"]
    assert sorted(p.name for p in (tmp_path / "html").iterdir()) == ["operator-note.txt"]
    assert not (tmp_path / "html" / MANIFEST).exists()
    assert run_stateful(clean["name"])["changed"] is False
