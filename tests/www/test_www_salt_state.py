"""salt/chatmail/www/init.sls: compiled by real Salt (saltsupport's ``render``), its commands run.

The container tests apply the whole formula; this checks the state's own logic quickly:
which states exist for which keys, and that the rendered command builds, is idempotent
under Salt's stateful protocol, and cleans up when the pages are disabled.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from chatmail_www.build import MANIFEST

VENV = Path(sys.executable).parent.parent


@pytest.fixture
def www_pillar(tmp_path, make_config) -> dict:
    """A pillar whose venv is this test venv and whose ini and web root are under tmp_path."""
    make_config("chat.example.org")
    return {
        "chatmail": {
            "mail_domain": "chat.example.org",
            "paths": {
                "venv": str(VENV),
                "ini": str(tmp_path / "chatmail.ini"),
                "www_root": str(tmp_path / "html"),
            },
            "www": {"enabled": True, "source": "", "source_dir": str(tmp_path / "www-src")},
        }
    }


@pytest.fixture
def www_states(render):
    """``www_states(pillar)``: the compiled chatmail-www-* states, by state id."""

    def compile_www(pillar: dict) -> dict:
        states = render("debian12", "www", pillar=pillar).states
        return {sid: body for sid, body in states.items() if sid.startswith("chatmail-www-")}

    return compile_www


def run_stateful(command: str) -> dict:
    done = subprocess.run(shlex.split(command), capture_output=True, text=True, check=True)
    return json.loads(done.stdout)  # Salt reads the whole stdout as one JSON object


def state_args(state: dict, function: str) -> dict:
    """The arguments of a compiled state, e.g. ``state_args(state, "cmd.run")``."""
    module, name = function.split(".")
    assert name in state[module], state
    merged = {}
    for item in state[module]:
        if isinstance(item, dict):
            merged.update(item)
    return merged


def test_default_build_state_is_idempotent(www_pillar, www_states, tmp_path):
    states = www_states(www_pillar)
    assert list(states) == ["chatmail-www-build"]
    build = state_args(states["chatmail-www-build"], "cmd.run")
    # test=True runs the dry run, which reports and writes nothing
    assert build["stateful"] == [{"test_name": build["name"] + " --dry-run"}]
    dry = run_stateful(build["stateful"][0]["test_name"])
    assert dry["changed"] is True and "index.html" in dry["written"]
    assert not (tmp_path / "html").exists()
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
    assert run_stateful(build["stateful"][0]["test_name"])["changed"] is False


def test_local_source_folder(www_pillar, www_states, tmp_path):
    source = tmp_path / "mine"
    source.mkdir()
    (source / "index.md").write_text("# Our relay {{ domain }}\n")
    www_pillar["chatmail"]["www"]["source"] = str(source)
    build = state_args(www_states(www_pillar)["chatmail-www-build"], "cmd.run")
    assert f"--src {source} " in build["name"]
    run_stateful(build["name"])
    assert "Our relay chat.example.org" in (tmp_path / "html" / "index.html").read_text()


def test_salt_url_source_is_copied_first(www_pillar, www_states):
    www = www_pillar["chatmail"]["www"]
    www["source"] = "salt://site/www"
    states = www_states(www_pillar)
    copy = state_args(states["chatmail-www-source"], "file.recurse")
    assert copy["name"] == www["source_dir"]
    assert copy["source"] == "salt://site/www" and copy["clean"] is True
    assert copy["require_in"] == [{"cmd": "chatmail-www-build"}]
    build = state_args(states["chatmail-www-build"], "cmd.run")
    assert f"--src {www['source_dir']} " in build["name"]


def test_disabled_pages_are_removed(www_pillar, www_states, tmp_path):
    run_stateful(state_args(www_states(www_pillar)["chatmail-www-build"], "cmd.run")["name"])
    (tmp_path / "html" / "operator-note.txt").write_text("not ours")
    www_pillar["chatmail"]["www"]["enabled"] = False
    states = www_states(www_pillar)
    assert list(states) == ["chatmail-www-clean"]
    clean = state_args(states["chatmail-www-clean"], "cmd.run")
    assert clean["onlyif"] == f"test -x {VENV}/bin/chatmail-www"
    assert clean["stateful"] == [{"test_name": clean["name"] + " --dry-run"}]
    assert "privacy.html" in run_stateful(clean["stateful"][0]["test_name"])["removed"]
    assert (tmp_path / "html" / "privacy.html").is_file()
    result = run_stateful(clean["name"])
    assert result["changed"] is True and "privacy.html" in result["removed"]
    assert sorted(p.name for p in (tmp_path / "html").iterdir()) == ["operator-note.txt"]
    assert not (tmp_path / "html" / MANIFEST).exists()
    assert run_stateful(clean["name"])["changed"] is False
