"""scripts/lib/pillar_from_ini.py: the pillar of a relay upstream's cmdeploy deployed.

The ini files here are upstream's own template (chatmaild/ini/chatmail.ini.f of relay
1.12, as `cmdeploy init` writes it: every setting a commented-out default) with lines an
operator edited. The relay the formula renders from the resulting pillar must serve the
same settings: its chatmail.ini, read by chatmaild, equals upstream's key by key.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from pillar_from_ini import (
    DEFAULTS_PATH,
    NO_COUNTERPART,
    main,
    pillar_from_params,
    read_params,
    staged_deb,
)
from test_dovecot_pins import UPSTREAM, grains, state_args

from chatmaild.config import DEFAULT_INI_PATH, load_config

DEFAULT_INI = str(DEFAULT_INI_PATH)
REPO = Path(__file__).resolve().parents[2]

#: upstream 1.12's template as `cmdeploy init chat.example.org` writes it (comments cut short)
TEMPLATE = """\
[params]

# mail domain (MUST be set to fully qualified chat mail domain)
mail_domain = chat.example.org

#
# Restrictions on user addresses
#

# email sending rate per user and minute
#max_user_send_per_minute = 60

# per-user max burst size for sending rate limiting (GCRA bucket capacity)
#max_user_send_burst_size = 10

# maximum mailbox size of a chatmail address
#max_mailbox_size = 500M

# maximum message size for an e-mail in bytes
#max_message_size = 31457280

# days after which mails are unconditionally deleted
#delete_mails_after = 20

# days after which large messages (>200k) are unconditionally deleted
#delete_large_after = 7

# days after which users without a successful login are deleted (database and mails)
#delete_inactive_users_after = 90

#username_min_length = 9
#username_max_length = 9
#password_min_length = 9
#max_load_1m = 5
#min_available_memory = 200M
#min_free_disk_space = 1G
#max_imap_connections = 10000
#max_smtp_connections = 1000

# tls_external_cert_and_key = /path/to/fullchain.pem /path/to/privkey.pem

#www_folder = www
#disable_ipv6 = False
#acme_email =
# iroh_relay =
# mtail_address = 127.0.0.1
#imap_rawlog = false
#imap_compress = false

# postal address of privacy contact
privacy_postal =

# email address of privacy contact
privacy_mail =

# postal address of the privacy data officer
privacy_pdo =

# postal address of the privacy supervisor
privacy_supervisor =
"""


def edited(**lines: str) -> str:
    """The template with ``key = value`` lines set, as an operator edits it."""
    text = TEMPLATE
    for key, value in lines.items():
        for commented in (f"#{key} =", f"# {key} =", f"{key} ="):
            start = text.find(f"\n{commented}")
            if start >= 0:
                end = text.index("\n", start + 1)
                text = f"{text[:start]}\n{key} = {value}{text[end:]}"
                break
        else:
            text += f"{key} = {value}\n"
    return text


def adopt(tmp_path, text: str) -> tuple[dict, list[str]]:
    ini = tmp_path / "chatmail.ini"
    ini.write_text(text)
    return pillar_from_params(read_params(ini))


OPERATOR_EDITS = {
    "max_user_send_per_minute": "600",
    "max_mailbox_size": "2G",
    "delete_mails_after": "40",
    "username_min_length": "6",
    "username_max_length": "12",
    "max_load_1m": "12.5",
    "disable_ipv6": "True",
    "acme_email": "ops@example.org",
    "iroh_relay": "https://iroh.example.org",
    "imap_compress": "true",
    "privacy_mail": "privacy@example.org",
    "privacy_postal": "Somewhere 1, Town",
}


def test_untouched_template_is_the_defaults(tmp_path):
    pillar, notes = adopt(tmp_path, TEMPLATE)
    assert pillar == {"chatmail": {"mail_domain": "chat.example.org"}}
    # upstream ran an iroh-relay of its own here; the formula runs none
    assert [n.split(":")[0] for n in notes] == ["iroh_relay"]


def test_every_edited_key_is_in_the_pillar(tmp_path):
    pillar, notes = adopt(tmp_path, edited(**OPERATOR_EDITS))
    chatmail = pillar["chatmail"]
    assert chatmail["ipv6"] is False
    assert chatmail["settings"] == {
        "max_user_send_per_minute": 600,
        "max_mailbox_size": "2G",
        "delete_mails_after": 40,
        "username_min_length": 6,
        "username_max_length": 12,
        "max_load_1m": 12.5,
        "acme_email": "ops@example.org",
        "iroh_relay": "https://iroh.example.org",
        "imap_compress": True,
        "privacy_mail": "privacy@example.org",
        "privacy_postal": "Somewhere 1, Town",
    }
    assert notes == []


def test_a_default_written_out_is_left_out(tmp_path):
    pillar, _ = adopt(tmp_path, edited(max_mailbox_size="500m", max_load_1m="5.0"))
    assert "settings" not in pillar["chatmail"]


def test_external_tls_and_mailboxes_dir(tmp_path):
    pillar, _ = adopt(
        tmp_path,
        edited(
            tls_external_cert_and_key="/etc/tls/fullchain.pem /etc/tls/privkey.pem",
            mailboxes_dir="/srv/mail",
        ),
    )
    chatmail = pillar["chatmail"]
    assert chatmail["tls"] == {
        "mode": "external",
        "cert": "/etc/tls/fullchain.pem",
        "key": "/etc/tls/privkey.pem",
    }
    assert chatmail["paths"] == {"mailboxes": "/srv/mail"}


@pytest.mark.parametrize("key", sorted(NO_COUNTERPART))
def test_keys_without_counterpart_are_named_not_carried(tmp_path, key):
    pillar, notes = adopt(tmp_path, edited(**{key: "127.0.0.1", "iroh_relay": ""}))
    assert "settings" not in pillar["chatmail"]
    assert [n.split(":")[0] for n in notes] == [key]


@pytest.mark.parametrize(
    "lines, expected",
    [
        ({"delete_mails_after": "20 # days"}, ["delete_mails_after: a comment after the value"]),
        ({"max_user_send_per_minut": "600"}, ["max_user_send_per_minut: unknown key"]),
        ({"max_message_size": "big"}, ["max_message_size: Input should be a valid integer"]),
        (
            {"delete_mails_after": "20 ; days", "max_mailbox_size": "lots", "colour": "red"},
            [
                "colour: unknown key",
                "delete_mails_after: a comment after the value",
                "max_mailbox_size: Value error, not a size",
            ],
        ),
        ({"username_min_length": "12"}, ["Value error, username_min_length is larger"]),
    ],
    ids=["comment", "unknown", "not-int", "three-at-once", "min-over-max"],
)
def test_bad_input_one_line_per_problem(tmp_path, lines, expected, capsys):
    ini = tmp_path / "chatmail.ini"
    ini.write_text(edited(**lines))
    out = tmp_path / "pillar.sls"
    assert main([str(ini), "--output", str(out)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == len(expected), errors
    for error, want in zip(sorted(errors), sorted(expected)):
        assert want in error
    assert not out.exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[params]\nmax_mailbox_size = 2G\n", "mail_domain: missing"),
        ("mail_domain = chat.example.org\n", "cannot read it"),
        ("[other]\nmail_domain = chat.example.org\n", "no [params] section"),
        ("[params]\nmail_domain = a\nmail_domain = b\n", "cannot read it"),
    ],
    ids=["no-domain", "no-section-header", "no-params", "duplicate-key"],
)
def test_unusable_files(tmp_path, text, expected, capsys):
    ini = tmp_path / "chatmail.ini"
    ini.write_text(text)
    assert main([str(ini)]) == 2
    assert expected in capsys.readouterr().err


def test_written_pillar_keeps_the_notes(tmp_path, capsys):
    ini = tmp_path / "chatmail.ini"
    ini.write_text(edited(mtail_address="127.0.0.1", max_user_send_per_minute="600"))
    out = tmp_path / "pillar.sls"
    assert main([str(ini), "--output", str(out)]) == 0
    text = out.read_text()
    assert "# note: mtail_address: mtail is not deployed" in text
    assert yaml.safe_load(text)["chatmail"]["settings"] == {"max_user_send_per_minute": 600}
    assert out.stat().st_mode & 0o777 == 0o600


def test_adopted_relay_serves_the_same_settings(tmp_path, render):
    """The formula's chatmail.ini for the pillar, read by chatmaild, equals upstream's."""
    text = edited(**OPERATOR_EDITS)
    pillar, _ = adopt(tmp_path, text)
    ours = tmp_path / "ours.ini"
    rendered = render("debian12", "adopted", pillar)
    ours.write_text(rendered.text("/usr/local/lib/chatmaild/chatmail.ini"))
    upstream = load_config(tmp_path / "chatmail.ini").config
    formula = load_config(ours).config
    written = set(read_params(tmp_path / "chatmail.ini")) - set(NO_COUNTERPART)
    assert len(written) > 10
    for key in sorted(written):
        assert getattr(formula, key) == getattr(upstream, key), key


@pytest.mark.skipif(os.geteuid() != 0 or Path(DEFAULT_INI).exists(), reason="root, no relay")
def test_deploy_adopt_refuses_a_host_that_is_no_upstream_relay():
    res = subprocess.run(
        [REPO / "scripts/deploy", "--adopt", "--dry-run"], capture_output=True, text=True
    )
    assert res.returncode == 2
    assert f"{DEFAULT_INI} not found: not a relay deployed by cmdeploy" in res.stderr


# --- the host's Dovecot: upstream's own build (inventory 3.2) ---------------------------

DOVECOT = yaml.safe_load(DEFAULTS_PATH.read_text())["dovecot"]
UPSTREAM_VERSION = DOVECOT["upstream"]["version"]
DEBIAN_12 = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\n'
DEBIAN_13 = 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\nID=debian\nVERSION_ID="13"\n'


def adopt_host(tmp_path, dovecot_version: str, os_release: str, *extra: str) -> tuple[dict, str]:
    """main() on the template for a host with this Dovecot and release: (pillar, stderr)."""
    ini = tmp_path / "chatmail.ini"
    ini.write_text(TEMPLATE)
    (tmp_path / "os-release").write_text(os_release)
    out = tmp_path / "pillar.sls"
    args = [str(ini), "--output", str(out), "--dovecot-version", dovecot_version,
            "--os-release", str(tmp_path / "os-release"), *extra]  # fmt: skip
    assert main(args) == 0
    return yaml.safe_load(out.read_text()), out.read_text()


def test_upstreams_dovecot_on_debian12_is_kept(tmp_path, capsys):
    pillar, text = adopt_host(tmp_path, UPSTREAM_VERSION, DEBIAN_12)
    assert pillar["chatmail"]["dovecot"] == {"packages": "upstream"}
    assert "# note: dovecot: upstream's Dovecot 1:2.3.21+dfsg1-3 stays" in text
    assert "note: dovecot: upstream's Dovecot" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("version", "os_release", "note"),
    [
        (UPSTREAM_VERSION, DEBIAN_13, "replaced by Debian GNU/Linux 13 (trixie)'s own"),
        ("1:2.3.19.1+dfsg1-2.1+deb12u7", DEBIAN_12, None),
        ("", DEBIAN_12, None),
    ],
    ids=["upstream-on-debian13", "debians-own", "not-installed"],
)
def test_other_dovecots_get_the_default_packages(tmp_path, version, os_release, note):
    pillar, text = adopt_host(tmp_path, version, os_release)
    assert "dovecot" not in pillar["chatmail"]
    assert (f"# note: dovecot: upstream's Dovecot {UPSTREAM_VERSION} is " in text) == bool(note)
    if note:
        assert note in text


def fake_debs(tmp_path) -> tuple[Path, Path, dict]:
    """/root with .debs named as upstream's deployer saves them (their URL's last part)
    and a defaults.yaml whose pins are those files' sha256, staged into target."""
    root, target = tmp_path / "root", tmp_path / "dovecot-upstream"
    root.mkdir()
    defaults = yaml.safe_load(DEFAULTS_PATH.read_text())
    upstream = defaults["dovecot"]["upstream"]
    upstream["dir"] = str(target)
    for package in upstream["sha256"]:
        for arch in upstream["sha256"][package]:
            data = f"{package} {arch} .deb".encode()
            name = upstream["url"].replace("{package}", package).replace("{arch}", arch)
            (root / name.rsplit("/", 1)[1]).write_bytes(data)
            upstream["sha256"][package][arch] = hashlib.sha256(data).hexdigest()
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(defaults))
    return root, target, upstream


def test_upstreams_debs_in_root_are_staged_where_the_formula_looks(tmp_path, capsys):
    root, target, upstream = fake_debs(tmp_path)
    # one download was cut short: its hash is not the pinned one, so it stays where it is
    broken = root / "dovecot-lmtpd_2.3.21%2Bdfsg1-3_arm64.deb"
    broken.write_bytes(b"truncated")
    stage = ["--defaults", str(tmp_path / "defaults.yaml"), "--stage-debs", str(root)]
    adopt_host(tmp_path, UPSTREAM_VERSION, DEBIAN_12, *stage)
    placed = sorted(p.name for p in target.iterdir())
    assert placed == sorted(
        f"{package}_{arch}.deb" for package in UPSTREAM for arch in ("amd64", "arm64")
        if (package, arch) != ("dovecot-lmtpd", "arm64")
    )  # fmt: skip
    for name in placed:
        downloaded = root / name.replace("_", "_2.3.21%2Bdfsg1-3_", 1)
        assert (target / name).read_bytes() == downloaded.read_bytes()
        assert (target / name).stat().st_mode & 0o777 == 0o644
    assert len([line for line in capsys.readouterr().err.splitlines() if "placed" in line]) == 5
    # a second run finds them in place
    adopt_host(tmp_path, UPSTREAM_VERSION, DEBIAN_12, *stage)
    assert "placed" not in capsys.readouterr().err


def test_debs_are_not_staged_where_upstreams_dovecot_goes(tmp_path):
    root, target, _ = fake_debs(tmp_path)
    stage = ["--defaults", str(tmp_path / "defaults.yaml"), "--stage-debs", str(root)]
    adopt_host(tmp_path, UPSTREAM_VERSION, DEBIAN_13, *stage)
    assert not target.exists()


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_staged_debs_are_the_files_the_formula_installs(render, arch):
    """packages.sls names the same files: with them in place it downloads nothing."""
    pillar = {"chatmail": {"mail_domain": "chat.example.org", "dovecot": {"packages": "upstream"}}}
    states = render("debian12", f"dovecot-upstream-{arch}", pillar=pillar,
                    grains=grains("debian12", arch)).states  # fmt: skip
    for package in UPSTREAM:
        deb = state_args(states, f"chatmail-dovecot-packages-{package}-deb", "file")
        assert deb["name"] == str(staged_deb(DOVECOT["upstream"], package, arch))
        assert deb["source_hash"] == f"sha256={DOVECOT['upstream']['sha256'][package][arch]}"
