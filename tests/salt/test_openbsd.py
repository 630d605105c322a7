"""The formula for OpenBSD 7.6+ (Salt grains os/os_family OpenBSD, osfinger OpenBSD-7):
per-OS map data only, OpenSMTPD instead of Postfix, rc.d scripts instead of systemd
units, and no Debian path, package or tool anywhere in what a minion would apply.

Rendered on this Debian host with OpenBSD's grains pinned (see saltsupport.render); the
configs are checked with Debian's builds of the same programs: smtpd -n from Debian 13's
OpenSMTPD 7.6 (chroot), doveconf from Debian 12's Dovecot 2.3 (OpenBSD ships 2.3.21),
sh -n for the rc.d scripts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from saltsupport import OPENBSD_GRAINS, PILLARS, RenderError
from test_render import GOLDEN_DIR, doveconf_check

OPENBSD_PILLARS = ["example", "underscore"]

# Things that exist only on Debian (or Linux with systemd): none may reach an OpenBSD
# minion, whether in a state's arguments or in a rendered file.
DEBIAN_ONLY = {
    "postfix": r"/etc/postfix|/var/spool/postfix|\bpostfix\b|postconf",
    "systemd": r"systemctl|/etc/systemd|\.service\b|\.timer\b|systemd-analyze",
    "apt/dpkg": r"\bapt(-get)?\b|\bdpkg\b|policy-rc\.d|/etc/apt/",
    "/usr/lib": r"/usr/lib/",
    "debian users": r"\bwww-data\b|\bnogroup\b",
    "debian packages": r"python3-venv|python3-dev|dovecot-core|dovecot-lmtpd|dovecot-imapd|"
                       r"dns-root-data|libnginx|opendkim-tools|\bopendoas\b|ca-certificates",
    "debian paths": r"/etc/dkimkeys|/usr/share/dns|/etc/ssl/certs/|/usr/sbin/nologin|/etc/unbound/",
    "nginx": r"\bnginx\b",
    "acmetool/certbot": r"acmetool|certbot",
}  # fmt: skip


@pytest.fixture(scope="module", params=OPENBSD_PILLARS)
def openbsd(request, render):
    return render("openbsd7", request.param, pillar=PILLARS[request.param](), grains=OPENBSD_GRAINS)


def test_salt_reports_openbsd_as_expected(salt_python):
    """The grains we pin are what Salt derives on OpenBSD (grains/core.py)."""
    code = (
        "from salt.grains.core import _osrelease_data as f;"
        "import json; print(json.dumps(f('OpenBSD', 'OpenBSD 7.6', '7.6')))"
    )
    out = json.loads(subprocess.run([salt_python, "-c", code], capture_output=True, text=True,
                                    check=True).stdout)  # fmt: skip
    assert out["osfinger"] == OPENBSD_GRAINS["osfinger"]
    assert out["osmajorrelease"] == OPENBSD_GRAINS["osmajorrelease"]


def test_map_is_openbsd_data(openbsd):
    m = openbsd.map
    assert (m["mta"], m["init"], m["tls"]["acme_client"]) == ("opensmtpd", "rcctl", "acme-client")
    assert m["users"]["vmail"] == "_vmail"
    assert m["dkim"]["signer"] == "filter-dkimsign"
    assert m["users"]["opendkim"] == "_dkimsign"
    assert m["service"]["opensmtpd"] == "smtpd"
    assert m["opensmtpd"]["config"] == "/etc/mail/smtpd.conf"
    assert m["opensmtpd"]["lmtp_socket"] == "/var/dovecot/lmtp"
    assert m["paths"]["www_root"].startswith("/var/www/")
    assert m["dovecot"]["syntax"] == "2.3"


def test_compiles_with_opensmtpd(openbsd):
    states = openbsd.states
    assert "chatmail-mta-service" in states
    assert not [sid for sid in states if sid.startswith("chatmail-mta-main-cf")]
    service = dict(kv for arg in states["chatmail-mta-service"]["service"] if isinstance(arg, dict)
                   for kv in arg.items())  # fmt: skip
    assert service["name"] == "smtpd"
    config = openbsd.files["/etc/mail/smtpd.conf"]
    assert config["check_cmd"] == "smtpd -n -f"


def leaks(text: str) -> dict[str, list[str]]:
    found = {}
    for what, pattern in DEBIAN_ONLY.items():
        hits = sorted({m.group(0) for m in re.finditer(pattern, text)})
        if hits:
            found[what] = hits
    return found


def test_no_debian_leaks_in_states(openbsd):
    problems = {}
    for sid, body in openbsd.states.items():
        found = leaks(json.dumps(body))
        if found:
            problems[sid] = found
    assert not problems, json.dumps(problems, indent=1)


# The shared validator script holds postfix and systemd subcommands; it is installed on
# every OS, but on OpenBSD no check_cmd calls it (test_check_cmds_are_openbsd_tools).
DORMANT_FILES = {"/usr/local/sbin/chatmail-check-config"}


def test_no_debian_leaks_in_files(openbsd):
    problems = {}
    for name, entry in openbsd.files.items():
        # the relay's own source tree (e.g. README.md), copied to build the venv from
        if name in DORMANT_FILES or name.startswith(openbsd.map["paths"]["src"] + "/"):
            continue
        found = leaks(name + "\n" + Path(entry["rendered"]).read_text())
        if found:
            problems[name] = found
    assert not problems, json.dumps(problems, indent=1)


def test_check_cmds_are_openbsd_tools(openbsd):
    """Every config is checked before it goes live, by a tool OpenBSD has."""
    check_cmds = {
        name: entry["check_cmd"] for name, entry in openbsd.files.items() if entry["check_cmd"]
    }
    tools = {cmd.split()[0].rsplit("/", 1)[-1] for cmd in check_cmds.values()}
    assert tools <= {
        "smtpd",
        "doveconf",
        "httpd",
        "relayd",
        "acme-client",
        "unbound-checkconf",
        "sh",
        "python",
    }, check_cmds
    assert not [cmd for cmd in check_cmds.values() if "chatmail-check-config" in cmd]
    expected = {"/etc/mail/smtpd.conf": "smtpd -n -f", "/etc/httpd.conf": "httpd -n -f",
                "/etc/relayd.conf": "relayd -n -f", "/etc/dovecot/dovecot.conf": "doveconf -n -c"}  # fmt: skip
    assert {name: check_cmds.get(name) for name in expected} == expected


RC_D_DAEMONS = ["doveauth", "chatmail_metadata", "lastlogin"]
# OpenSMTPD runs filtermail's rules as its filters (chatmail-smtpd-filter): no daemons
NO_RC_D = ["filtermail", "filtermail_incoming"]


def test_rc_d_scripts(openbsd, tmp_path):
    """rc.d(8) scripts for the daemons: valid sh, rc.subr conventions, the right user,
    and a process pattern that matches how the venv's Python shows the console script."""
    m = openbsd.map
    for daemon in RC_D_DAEMONS:
        path = f"/etc/rc.d/{daemon}"
        assert openbsd.files[path]["mode"] == "0555"
        text = openbsd.text(path)
        assert text.startswith("#!/bin/ksh\n")
        script = tmp_path / daemon
        script.write_text(text)
        result = subprocess.run(
            ["sh", "-n", str(script)], check=False, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert f'daemon_user="{m["users"]["vmail"]}"' in text
        assert "\n. /etc/rc.d/rc.subr\n" in text and text.rstrip().endswith("rc_cmd $1")
        assert "rc_bg=YES" in text
        daemon_line = re.search(r'^daemon="([^"]+)"', text, re.MULTILINE).group(1)
        flags = re.search(r'^daemon_flags="([^"]*)"', text, re.MULTILINE).group(1)
        assert daemon_line.startswith(m["paths"]["venv"] + "/bin/")
        assert m["paths"]["ini"] in flags
        pexp = re.search(r'^pexp="([^"]+)"', text, re.MULTILINE).group(1)
        pexp = pexp.replace("${daemon}", daemon_line).replace(
            "${daemon_flags:+ ${daemon_flags}}", f" {flags}"
        )
        # what ps shows for a venv console script (its shebang runs the venv's python)
        shown = f"{m['paths']['venv']}/bin/python3.11 {daemon_line} {flags}"
        assert re.fullmatch(pexp, shown), (pexp, shown)
        service = dict(kv for arg in openbsd.states[f"chatmail-chatmaild-{daemon.replace('_', '-')}-service"]["service"]
                       if isinstance(arg, dict) for kv in arg.items())  # fmt: skip
        assert service["name"] == daemon
    for daemon in NO_RC_D:
        assert f"/etc/rc.d/{daemon}" not in openbsd.files
        sid = f"chatmail-chatmaild-{daemon.replace('_', '-')}"
        assert "dead" in openbsd.states[f"{sid}-service"]["service"]
        assert "absent" in openbsd.states[f"{sid}-unit"]["file"]
    doveauth = openbsd.text("/etc/rc.d/doveauth")
    assert "install -d -o _vmail -g _vmail -m 0755 /run/doveauth" in doveauth


def test_expiry_is_a_cron_job(openbsd):
    cron = dict(kv for arg in openbsd.states["chatmail-expiry-cron"]["cron"] if isinstance(arg, dict)
                for kv in arg.items())  # fmt: skip
    assert cron["user"] == "_vmail"
    assert cron["name"].endswith("chatmail-expire /usr/local/lib/chatmaild/chatmail.ini --remove")


def test_web_is_httpd_and_relayd(openbsd):
    m = openbsd.map
    httpd = openbsd.text("/etc/httpd.conf")
    relayd = openbsd.text("/etc/relayd.conf")
    d = m["mail_domain"]
    assert f'server "{d}"' in httpd and 'root "/htdocs/chatmail"' in httpd
    assert 'root "/chatmail-wellknown"' in httpd and 'root "/acme"' in httpd
    assert f"listen on 127.0.0.1 port {m['web']['httpd_port']}" in httpd
    assert 'tls keypair "mailserver"' in relayd
    assert 'match request path "/new" method POST forward to <api>' in relayd
    # relayd ends TLS itself: it replaces X-Forwarded-For with the client's address
    assert 'match request header set "X-Forwarded-For" value "$REMOTE_ADDR"' in relayd
    assert f"forward to <api> port {m['api']['port']}" in relayd
    # no ALPN switch on OpenBSD: autoconfig offers 443 for nothing but the web
    autoconfig = openbsd.text(m["paths"]["wellknown"] + "/config-v1.1.xml")
    assert f"<port>{m['ports']['https']}</port>" not in autoconfig
    assert f"<port>{m['ports']['imaps']}</port>" in autoconfig


def test_dovecot_passes_doveconf_2_3(openbsd, tmp_path, test_cert):
    """OpenBSD packages Dovecot 2.3.21: the 2.3 template, checked by Debian 12's doveconf."""
    m = openbsd.map
    text = openbsd.text("/etc/dovecot/dovecot.conf")
    assert "/var/spool/postfix" not in text
    assert "ssl_dh" not in text and m["dovecot"]["ssl_dh"] == ""
    result = doveconf_check(openbsd, tmp_path, *test_cert, None)
    assert "unix_listener lmtp" in result
    assert "ssl_min_protocol = TLSv1.3" in result


def test_golden_map(render, tmp_path):
    """The merged OpenBSD map for pillar.example, like test_render's per-platform golden
    files (CHATMAIL_UPDATE_GOLDEN=1 rewrites it)."""
    merged = dict(
        render("openbsd7", "example", pillar=PILLARS["example"](), grains=OPENBSD_GRAINS).map
    )
    merged["version"] = "<package version>"
    golden = GOLDEN_DIR / "openbsd7.json"
    text = json.dumps(merged, indent=2, sort_keys=True) + "\n"
    if os.environ.get("CHATMAIL_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert golden.exists(), "run with CHATMAIL_UPDATE_GOLDEN=1 to create it"
    assert json.loads(golden.read_text()) == json.loads(text)


def leaves(tree: dict, prefix: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key)


def test_pillar_example_pins_no_per_os_value(render):
    """pillar.example is the operator's starting point on every OS: a key it sets whose
    default differs between Debian and OpenBSD would pin one OS's value on the other
    (e.g. /etc/dkimkeys or acmetool on OpenBSD). Such keys belong commented out."""
    minimal = {"chatmail": {"mail_domain": "chat.example.org"}}
    debian = render("debian12", "minimal", pillar=minimal).map
    openbsd = render("openbsd7", "minimal", pillar=minimal, grains=OPENBSD_GRAINS).map
    example = PILLARS["example"]()["chatmail"]

    def get(tree, path):
        for key in path:
            tree = tree[key]
        return tree

    pinned = [
        ".".join(path)
        for path in leaves(example)
        # "" and null mean "derived"/"unset" (e.g. tls.cert): they pin nothing
        if get(example, path) not in ("", None) and get(debian, path) != get(openbsd, path)
    ]
    assert not pinned, f"pillar.example pins per-OS keys: {pinned}"


def state_args(states: dict, state_id: str, module: str) -> dict:
    return dict(
        kv for arg in states[state_id][module] if isinstance(arg, dict) for kv in arg.items()
    )


def test_smtpd_queue_snapshot_is_a_root_cron_job(openbsd):
    """smtpd lists its queue to root only: a root cron job writes the listing the API
    reads every minute, else the API's queue check stays `unknown` forever."""
    settings = state_args(openbsd.states, "chatmail-api-settings", "file")["dataset"]
    settings = json.loads(settings) if isinstance(settings, str) else settings
    snapshot = settings["queue_snapshot"]
    cron = state_args(openbsd.states, "chatmail-api-smtpd-queue-cron", "cron")
    assert cron["user"] == "root"
    assert cron["minute"] == "*/1"
    assert "smtpctl show queue" in cron["name"] and cron["name"].endswith(
        f"mv {snapshot}.tmp {snapshot}"
    )


@pytest.mark.parametrize(
    ("interval", "minute", "hour"),
    [("5min", "*/5", "*"), ("15min", "*/15", "*"), ("2h", "0", "*/2")],
)
def test_stats_cron_follows_stats_interval(render, interval, minute, hour):
    pillar = {"chatmail": {"mail_domain": "chat.example.org", "api": {"stats_interval": interval}}}
    rendered = render("openbsd7", f"stats-{interval}", pillar=pillar, grains=OPENBSD_GRAINS)
    cron = state_args(rendered.states, "chatmail-api-stats-cron", "cron")
    assert (cron["minute"], cron.get("hour", "*")) == (minute, hour)
    assert cron["user"] == "_vmail"


@pytest.mark.parametrize("script", [*RC_D_DAEMONS, "chatmail_api"])
def test_rc_d_daemons_have_login_classes(openbsd, script):
    """rc.subr(8) runs /etc/rc.d/<script> with the login class <script> when
    /etc/login.conf.d/<script> defines it: the relay's memory and file ceilings."""
    limit = openbsd.map["limits"][script.replace("_", "-")]
    text = openbsd.text(f"/etc/login.conf.d/{script}")
    entry = [line.strip() for line in text.splitlines() if not line.startswith("#")]
    assert entry[0] == f"{script}:\\"
    assert f":datasize={limit['memory']}:\\" in entry
    assert entry[-1] == ":tc=daemon:"
    if "openfiles" in limit:
        assert f":openfiles={limit['openfiles']}:\\" in entry
    sid = (
        "chatmail-api"
        if script == "chatmail_api"
        else f"chatmail-chatmaild-{script.replace('_', '-')}"
    )
    watched = state_args(openbsd.states, f"{sid}-service", "service")["watch"]
    assert {"file": f"{sid}-login-class"} in watched


def test_login_class_needs_a_size(render):
    pillar = {
        "chatmail": {"mail_domain": "chat.example.org", "limits": {"lastlogin": {"memory": "10%"}}}
    }
    with pytest.raises(RenderError, match="limits:lastlogin:memory must be a size"):
        render("openbsd7", "percent", pillar=pillar, grains=OPENBSD_GRAINS)
