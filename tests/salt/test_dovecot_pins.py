"""chatmail:dovecot:packages: which Dovecot packages the formula installs and how it pins
them (salt/chatmail/dovecot/packages.sls), rendered for each choice; the pin files go
through apt's own preferences parser."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from saltsupport import PLATFORMS, RenderError

DOVECOT = ["dovecot-core", "dovecot-imapd", "dovecot-lmtpd", "dovecot-auth-lua"]
UPSTREAM = ["dovecot-core", "dovecot-imapd", "dovecot-lmtpd"]


def pillar(packages: str) -> dict:
    return {"chatmail": {"mail_domain": "chat.example.org", "dovecot": {"packages": packages}}}


def grains(platform: str, arch: str = "amd64") -> dict:
    return dict(PLATFORMS[platform], osarch=arch)


def state_args(states: dict, state_id: str, module: str) -> dict:
    return dict(
        kv for arg in states[state_id][module] if isinstance(arg, dict) for kv in arg.items()
    )


def apt_accepts_preferences(text: str, tmp_path: Path) -> None:
    """apt-cache reads the file as the relay's apt would; a bad record is an error."""
    prefs = tmp_path / "preferences"
    prefs.write_text(text)
    (tmp_path / "none").mkdir()
    result = subprocess.run(
        ["apt-cache", "-o", f"Dir::Etc::Preferences={prefs}",
         "-o", f"Dir::Etc::PreferencesParts={tmp_path / 'none'}", "policy", "dovecot-core"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr


def api_dovecot(rendered) -> dict:
    dataset = state_args(rendered.states, "chatmail-api-settings", "file")["dataset"]
    return (json.loads(dataset) if isinstance(dataset, str) else dataset)["dovecot"]


@pytest.mark.parametrize("platform", ["debian12", "debian13"])
def test_debian_is_pinned_to_debian(render, platform, tmp_path):
    rendered = render(platform, "dovecot-debian", pillar=pillar("debian"), grains=grains(platform))
    states = rendered.states
    assert set(DOVECOT) <= set(state_args(states, "chatmail-packages", "pkg")["pkgs"])
    pin = state_args(states, "chatmail-dovecot-packages-pin", "file")
    assert "Pin: release o=Debian\nPin-Priority: 1001" in pin["contents"]
    apt_accepts_preferences(pin["contents"], tmp_path)
    assert "absent" in states["chatmail-dovecot-packages-list"]["file"]
    replace = state_args(states, "chatmail-dovecot-packages", "cmd")
    assert "--allow-downgrades" in replace["name"] and "Candidate" in replace["unless"]
    assert api_dovecot(rendered)["packages"] == "debian"


@pytest.mark.parametrize(
    ("platform", "codename"), [("debian12", "bookworm"), ("debian13", "trixie")]
)
def test_patched_comes_from_the_served_repository(render, platform, codename, tmp_path):
    rendered = render(
        platform, "dovecot-patched", pillar=pillar("patched"), grains=grains(platform)
    )
    states = rendered.states
    repo = state_args(states, "chatmail-dovecot-packages-repo", "file")
    assert repo["source"] == f"salt://dovecot-packages/{codename}"
    assert repo["name"] == "/var/lib/chatmail/dovecot-packages" and repo["clean"] is True
    listing = state_args(states, "chatmail-dovecot-packages-list", "file")
    assert listing["contents"] == "deb [trusted=yes] file:/var/lib/chatmail/dovecot-packages ./"
    pin = state_args(states, "chatmail-dovecot-packages-pin", "file")["contents"]
    assert "Package: dovecot-*\nPin: version /[+]chatmail[0-9]+$/\nPin-Priority: 1001" in pin
    apt_accepts_preferences(pin, tmp_path)
    # the repository and pin exist before the one package transaction installs Dovecot
    transaction = state_args(states, "chatmail-packages", "pkg")
    assert {"sls": "chatmail.dovecot.packages"} in transaction["require"]
    assert set(DOVECOT) <= set(transaction["pkgs"])
    index = state_args(states, "chatmail-dovecot-packages-index", "cmd")
    assert {"file": "chatmail-dovecot-packages-repo"} in index["onchanges"]
    service = state_args(states, "chatmail-dovecot-service", "service")
    assert {"cmd": "chatmail-dovecot-packages"} in service["watch"]
    assert api_dovecot(rendered) == {
        "packages": "patched",
        "version_command": ["dpkg-query", "-W", "-f=${Version}", "dovecot-core"],
        "upstream_version": "1:2.3.21+dfsg1-3",
    }


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_upstream_is_downloaded_by_sha256(render, arch, tmp_path):
    rendered = render("debian12", f"dovecot-upstream-{arch}", pillar=pillar("upstream"),
                      grains=grains("debian12", arch))  # fmt: skip
    states = rendered.states
    assert not set(DOVECOT) & set(state_args(states, "chatmail-packages", "pkg")["pkgs"])
    sources = state_args(states, "chatmail-dovecot-packages", "pkg")["sources"]
    assert [next(iter(s)) for s in sources] == UPSTREAM
    for package in UPSTREAM:
        deb = state_args(states, f"chatmail-dovecot-packages-{package}-deb", "file")
        assert deb["source"] == (
            f"https://download.delta.chat/dovecot/{package}_2.3.21%2Bdfsg1-3_{arch}.deb"
        )
        assert deb["source_hash"].startswith("sha256=") and len(deb["source_hash"]) == 71
        assert {package: deb["name"]} in sources
    pin = state_args(states, "chatmail-dovecot-packages-pin", "file")["contents"]
    assert "Pin: version 1:2.3.21+dfsg1-3\n" in pin
    apt_accepts_preferences(pin, tmp_path)
    service = state_args(states, "chatmail-dovecot-service", "service")
    assert {"pkg": "chatmail-dovecot-packages"} in service["watch"]


@pytest.mark.parametrize(
    ("platform", "packages", "arch", "message"),
    [
        ("debian12", "fast", "amd64", "must be debian, patched or upstream"),
        ("ubuntu2404", "patched", "amd64", "exists for Debian only"),
        ("debian13", "upstream", "amd64", "Dovecot 2.3.21 for Debian 12"),
        ("debian12", "upstream", "riscv64", "no dovecot-core for architecture riscv64"),
    ],
    ids=["unknown", "patched-on-ubuntu", "upstream-on-debian13", "upstream-other-arch"],
)
def test_impossible_choices_fail_loudly(render, platform, packages, arch, message):
    with pytest.raises(RenderError, match=message):
        render(platform, f"dovecot-bad-{packages}", pillar=pillar(packages),
               grains=grains(platform, arch))  # fmt: skip
