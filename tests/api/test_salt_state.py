"""salt/chatmail/api compiled and rendered by real Salt (the formula tests' harness)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from chatmail_api.settings import parse_settings
from saltsupport import OPENBSD_GRAINS, PLATFORMS, REPO


@pytest.fixture(scope="module")
def rendered(render):
    """``rendered(pillar, grains=None) -> (states, files, map)``; Debian 12 by default."""

    def render_api(pillar: dict, grains: dict | None = None):
        result = render("debian12", "api", pillar=pillar, grains=grains or PLATFORMS["debian12"])
        files = {name: result.text(name) for name in result.files}
        return result.states, files, result.map

    return render_api


def state_args(states: dict, state_id: str) -> dict:
    body = states[state_id]
    module = next(k for k in body if not k.startswith("__"))
    args = {}
    for item in body[module]:
        if isinstance(item, dict):
            args.update(item)
    return args


def test_default_pillar(rendered):
    states, files, m = rendered({"chatmail": {"mail_domain": "chat.example.org"}})
    settings_data = state_args(states, "chatmail-api-settings")["dataset"]
    if isinstance(settings_data, str):
        settings_data = json.loads(settings_data)
    settings = parse_settings(settings_data)  # what the API will load
    assert settings.listen == "127.0.0.1" and settings.port == 8077
    assert settings.tokens.admin == {}  # secrets stay out of api.json
    assert {s.name for s in settings.services} >= {"postfix", "dovecot", "opendkim", "doveauth"}
    assert settings.tls_cert == Path(m["tls"]["cert"])
    assert settings.dns.dkim_txt == Path(m["api"]["dkim_public"])
    assert str(settings.account_stats_file).startswith(m["api"]["stats_dir"])

    tokens = state_args(states, "chatmail-api-tokens")
    assert tokens["creates"] == m["api"]["tokens_file"] and tokens["umask"] == "077"

    link = state_args(states, "chatmail-api-nocreate-link")
    assert link["name"] == m["paths"]["nocreate"]
    assert link["target"] == m["api"]["account_creation_dir"] + "/nocreate"

    unit = files["/etc/systemd/system/chatmail-api.service"]
    for line in (
        "User=chatmail-api",
        "SupplementaryGroups=postdrop",
        f"LoadCredential=tokens:{m['api']['tokens_file']}",
        f"ReadWritePaths={m['api']['account_creation_dir']}",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
    ):
        assert line in unit, line
    assert "--tokens-file ${CREDENTIALS_DIRECTORY}/tokens" in unit
    stats = files["/etc/systemd/system/chatmail-account-stats.service"]
    assert "User=vmail" in stats and "/bin/chatmail-accountstats " in stats
    assert "Type=oneshot" in stats

    watched = {next(iter(w.values())) for w in state_args(states, "chatmail-api-service")["watch"]}
    assert {"chatmail-api-settings", "chatmail-api-tokens", "chatmail-chatmaild-venv"} <= watched


def test_pillar_tokens_and_pin(rendered):
    tokens = {"monitor": {"grafana": "m" * 24}, "admin": {"alice": "a" * 24}}
    states, _, _ = rendered(
        {
            "chatmail": {
                "mail_domain": "chat.example.org",
                "api": {"tokens": tokens, "account_creation_pin": False, "allow": ["127.0.0.0/8"]},
            }
        }
    )
    serialized = state_args(states, "chatmail-api-tokens")
    dataset = serialized["dataset"]
    assert (json.loads(dataset) if isinstance(dataset, str) else dataset) == tokens
    assert serialized["mode"] == "0600" and serialized["user"] == "root"
    assert "chatmail-api-nocreate-link" not in states  # chatmail.chatmaild owns the path
    settings_data = state_args(states, "chatmail-api-settings")["dataset"]
    if isinstance(settings_data, str):
        settings_data = json.loads(settings_data)
    settings = parse_settings(settings_data)
    assert settings.account_creation_pin is False
    assert [str(n) for n in settings.allow] == ["127.0.0.0/8"]


def test_units_pass_systemd_analyze(rendered, tmp_path, fake_venv):
    """The formula's own unit check (systemd-analyze verify), as on the relay."""
    _, files, m = rendered({"chatmail": {"mail_domain": "chat.example.org"}})
    check = REPO / "salt" / "chatmail" / "files" / "chatmail-check-config"
    for unit in (
        "chatmail-api.service",
        "chatmail-account-stats.service",
        "chatmail-account-stats.timer",
    ):
        candidate = tmp_path / unit
        candidate.write_text(
            files[f"/etc/systemd/system/{unit}"].replace(m["paths"]["venv"], str(fake_venv))
        )
        result = subprocess.run(
            ["sh", str(check), "unit", unit, str(candidate)],
            check=False,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{unit}: {result.stdout}{result.stderr}"

    broken = tmp_path / "broken.service"
    broken.write_text(
        files["/etc/systemd/system/chatmail-api.service"].replace(
            "ProtectSystem=strict", "ProtectSystem=sometimes"
        )
    )
    result = subprocess.run(
        ["sh", str(check), "unit", "chatmail-api.service", str(broken)],
        check=False,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1  # the check can fail


def test_openbsd_rc_script_and_service_names(rendered):
    states, files, m = rendered({"chatmail": {"mail_domain": "chat.example.org"}}, OPENBSD_GRAINS)
    script = files["/etc/rc.d/chatmail_api"]
    assert f'daemon_user="{m["users"]["api"]}"' in script
    assert f"--tokens-file {m['api']['tokens_file']}" in script
    settings_data = state_args(states, "chatmail-api-settings")["dataset"]
    if isinstance(settings_data, str):
        settings_data = json.loads(settings_data)
    settings = parse_settings(settings_data)
    assert settings.service_manager == "rcctl"
    assert "chatmail_metadata" in {s.name for s in settings.services}
    assert settings.queue_command[0] == "smtpctl"
    assert "chatmail-api-stats-cron" in states
    assert not any(name.startswith("/etc/systemd") for name in files if "api" in name)
