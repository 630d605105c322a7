"""The formula for OpenBSD 7.6+ (Salt grains os/os_family OpenBSD, osfinger OpenBSD-7):
per-OS map data only, OpenSMTPD instead of Postfix, rc.d scripts instead of systemd
units, and no Debian path, package or tool anywhere in what a minion would apply.

Rendered on this Debian host with OpenBSD's grains pinned (see conftest.render); the
configs are checked with Debian's builds of the same programs: smtpd -n from Debian 13's
OpenSMTPD 7.6 (chroot), doveconf from Debian 12's Dovecot 2.3 (OpenBSD ships 2.3.21),
sh -n for the rc.d scripts.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import PILLARS  # noqa: E402
from test_render import doveconf_check  # noqa: E402

# What Salt's grains/core.py reports on OpenBSD 7.6 (osfinger is "<os>-<major>").
OPENBSD_GRAINS = {
    "os_family": "OpenBSD", "os": "OpenBSD", "osfinger": "OpenBSD-7", "osrelease": "7.6",
    "osmajorrelease": 7, "kernel": "OpenBSD", "oscodename": "",
}  # fmt: skip
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


def test_salt_reports_openbsd_as_expected():
    """The grains we pin are what Salt derives on OpenBSD (grains/core.py)."""
    salt_python = Path("/var/cache/chatmail-test/salt-venv/bin/python")
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


def test_no_debian_leaks_in_files(openbsd):
    problems = {}
    for name, entry in openbsd.files.items():
        found = leaks(name + "\n" + Path(entry["rendered"]).read_text())
        if found:
            problems[name] = found
    assert not problems, json.dumps(problems, indent=1)
