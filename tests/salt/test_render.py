"""The Salt formula compiles for every platform and its config files pass the real validators.

For each platform (Debian 12, Debian 13, Ubuntu 24.04 grains) and pillar (pillar.example,
an _-domain test relay, external TLS, certbot) the formula is compiled with
``state.show_sls chatmail`` and every managed file is rendered the way file.managed does.
Then each config goes through the validator its check_cmd runs on a relay: postconf (via
the formula's own chatmail-check-config), doveconf (Debian 12's 2.3 on the host, Debian
13's 2.4 in a trixie chroot), nginx -t, unbound-checkconf, opendkim -n,
systemd-analyze verify, and chatmaild's own ini parser.

TLS paths, the DKIM key directory and the venv are rewritten to test stand-ins before
validation: the validators open those files, the syntax around them is unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from saltsupport import PILLARS, PLATFORMS, REPO, RenderError, _example_pillar, run
from test_defaults import DERIVED

from chatmaild.config import Config, load_config

CHECK_SCRIPT = REPO / "salt" / "chatmail" / "files" / "chatmail-check-config"
GOLDEN_DIR = Path(__file__).parent / "golden"
DAEMONS = ["doveauth", "chatmail-metadata", "lastlogin", "filtermail", "filtermail-incoming"]

# certbot differs from the example only in the ACME client: one platform is enough.
COMBOS = [(platform, pillar) for platform in PLATFORMS for pillar in PILLARS if pillar != "certbot"]
COMBOS.append(("debian12", "certbot"))
COMBO_IDS = [f"{platform}-{pillar}" for platform, pillar in COMBOS]


@pytest.fixture(scope="session")
def prerendered(render):
    render.prerender(COMBOS)


@pytest.fixture(params=COMBOS, ids=COMBO_IDS)
def rendered(request, render, prerendered):
    return render(*request.param)


def stand_in(text: str, m: dict, cert: Path, key: Path, venv: Path | None = None) -> str:
    """Point a rendered config at test files instead of the relay's."""
    text = text.replace(m["tls"]["cert"], str(cert)).replace(m["tls"]["key"], str(key))
    if venv is not None:
        text = text.replace(m["paths"]["venv"], str(venv))
    return text


# -- compilation ------------------------------------------------------------------------


def test_show_sls_compiles_with_contract_ids(rendered):
    ids = set(rendered.states)
    contract = {
        "chatmail-packages",
        "chatmail-mta-service",
        "chatmail-dovecot-service",
        "chatmail-web-service",
        "chatmail-chatmaild-venv",
        "chatmail-resolver-service",
        *(f"chatmail-chatmaild-{daemon}-service" for daemon in DAEMONS),
    }
    assert contract <= ids, contract - ids
    assert all(i.startswith("chatmail-") for i in ids), [
        i for i in ids if not i.startswith("chatmail-")
    ]
    assert len(ids) > 60


def test_every_command_is_guarded(rendered):
    """A second apply reports no changes: every cmd.run has creates/unless/onlyif/onchanges
    (or is stateful and reports changes itself)."""
    guards = {"creates", "unless", "onlyif", "onchanges", "stateful"}
    unguarded = []
    for state_id, body in rendered.states.items():
        if not isinstance(body, dict) or "cmd" not in body:
            continue
        keys = {k for item in body["cmd"] if isinstance(item, dict) for k in item}
        if not keys & guards:
            unguarded.append(state_id)
    assert not unguarded


def test_map_derivations(rendered):
    m = rendered.map
    assert m["mail_domain"]
    assert m["paths"]["mailboxes"] == f"/home/vmail/mail/{m['mail_domain']}"
    expected_mode = (
        "external"
        if m["mail_domain"] == "mail.example.net"
        else "self"
        if m["mail_domain"].startswith("_")
        else "acme"
    )
    assert m["tls"]["mode"] == expected_mode
    assert m["settings"]["disable_ipv6"] is (not m["ipv6"])
    assert m["version"]


@pytest.mark.parametrize("platform", PLATFORMS)
def test_dovecot_syntax_follows_the_os(render, platform):
    rendered = render(platform, "example")
    expected = "2.4" if platform == "debian13" else "2.3"
    assert rendered.map["dovecot"]["syntax"] == expected
    conf = rendered.text("/etc/dovecot/dovecot.conf")
    assert f"Dovecot {expected} syntax" in conf


@pytest.mark.parametrize("platform", PLATFORMS)
def test_golden_map(render, platform):
    """The merged map for pillar.example; CHATMAIL_UPDATE_GOLDEN=1 rewrites the files."""
    merged = dict(render(platform, "example").map)
    merged["version"] = "<package version>"
    golden = GOLDEN_DIR / f"{platform}.json"
    text = json.dumps(merged, indent=2, sort_keys=True) + "\n"
    if os.environ.get("CHATMAIL_UPDATE_GOLDEN"):
        GOLDEN_DIR.mkdir(exist_ok=True)
        golden.write_text(text)
    assert golden.exists(), "run with CHATMAIL_UPDATE_GOLDEN=1 to create it"
    old, new = json.loads(golden.read_text()), json.loads(text)
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    assert changed == [], (
        f"merged map differs from {golden.name} in {changed}: if intended, regenerate with "
        "CHATMAIL_UPDATE_GOLDEN=1 pytest tests/salt/test_render.py -k golden"
    )


def test_missing_os_file_fails_loudly(render):
    grains = dict(PLATFORMS["debian12"], osfinger="Debian-99")
    with pytest.raises(RenderError, match="Debian-99"):
        render("debian99", "example", pillar=PILLARS["example"](), grains=grains)


def test_missing_mail_domain_fails_loudly(render):
    with pytest.raises(RenderError, match="mail_domain is required"):
        render("debian12", "nodomain", pillar={"chatmail": {"settings": {}}})


def test_external_mode_needs_both_paths(render):
    pillar = {"chatmail": {"mail_domain": "x.example", "tls": {"mode": "external", "cert": "/c"}}}
    with pytest.raises(RenderError, match="needs tls:cert and tls:key"):
        render("debian12", "halfexternal", pillar=pillar)


# -- chatmail.ini, version, nocreate ---------------------------------------------------


def test_chatmail_ini_is_what_chatmaild_reads(rendered):
    m = rendered.map
    config = load_config(rendered.path("/usr/local/lib/chatmaild/chatmail.ini")).config
    assert config.mail_domain == m["mail_domain"]
    assert config.max_mailbox_size == m["settings"]["max_mailbox_size"]
    assert config.max_smtp_connections == m["settings"]["max_smtp_connections"]
    assert config.disable_ipv6 is (not m["ipv6"])
    assert config.tls_cert_mode == m["tls"]["mode"]
    # map.jinja derives the mode by upstream's rule, which chatmaild keeps for inis
    # without tls_mode: both give the same mode.
    assert config.model_copy(update={"tls_mode": None}).tls_cert_mode == m["tls"]["mode"]
    assert str(config.mailboxes_path) == m["paths"]["mailboxes"]
    assert str(config.nocreate_file) == "/etc/chatmail-nocreate"
    assert str(config.counters_dir) == "/var/lib/chatmail/counters"
    assert config.iroh_relay == ""


def test_self_mode_on_an_ordinary_domain_reaches_the_daemons(render):
    """pillar.example offers ``tls: mode: self`` for any domain: chatmail.ini carries the
    mode, so the API answers the GET /new nginx passes on instead of redirecting it."""
    pillar = {"chatmail": {"mail_domain": "chat.example.org", "tls": {"mode": "self"}}}
    rendered = render("debian12", "self-ordinary", pillar=pillar)
    ini = rendered.path("/usr/local/lib/chatmaild/chatmail.ini")
    assert "tls_mode = self" in ini.read_text().splitlines()
    assert load_config(ini).config.tls_cert_mode == "self"
    nginx = rendered.text("/etc/nginx/nginx.conf")
    assert "limit_req zone=newaccount" in nginx and "dcaccount:" not in nginx


def test_ipv4_domain_is_self_signed_as_upstream(render):
    rendered = render("debian12", "ipv4", pillar={"chatmail": {"mail_domain": "203.0.113.5"}})
    ini = rendered.path("/usr/local/lib/chatmaild/chatmail.ini")
    assert rendered.map["tls"]["mode"] == "self"
    assert load_config(ini).config.tls_cert_mode == "self"


def test_version_file(render):
    assert render("debian12", "underscore").text("/etc/chatmail-version").strip() == (
        "v1.2.3-4-gdeadbee"
    )
    assert (
        render("debian12", "example").text("/etc/chatmail-version").startswith("chatmail-relay 0.")
    )


def test_nocreate_follows_the_pin(render):
    example = render("debian12", "example").states
    assert "chatmail-chatmaild-nocreate" not in example
    assert "absent" in json.dumps(
        render("debian12", "external").states["chatmail-chatmaild-nocreate"]
    )
    pinned_off = render("debian12", "underscore").states["chatmail-chatmaild-nocreate"]
    assert "managed" in json.dumps(pinned_off)


# -- Postfix ------------------------------------------------------------------------------


def postfix_dir(rendered, tmp_path, cert, key) -> Path:
    d = tmp_path / "postfix"
    d.mkdir()
    for name in (
        "main.cf",
        "master.cf",
        "login_map",
        "submission_header_cleanup",
        "lmtp_header_cleanup",
        "smtp_tls_policy_map",
    ):
        text = stand_in(rendered.text(f"/etc/postfix/{name}"), rendered.map, cert, key)
        (d / name).write_text(text.replace("/etc/postfix/", f"{d}/"))
    return d


def test_postfix_passes_postconf(rendered, tmp_path, test_cert):
    d = postfix_dir(rendered, tmp_path, *test_cert)
    # Both ways the formula runs the check: main.cf against the new master.cf, and
    # master.cf against the candidate main.cf.
    for kind, counterpart, candidate in (
        ("postfix-main", "master.cf", "main.cf"),
        ("postfix-master", "main.cf", "master.cf"),
    ):
        result = run(["sh", str(CHECK_SCRIPT), kind, str(d / counterpart), str(d / candidate)])
        assert result.returncode == 0, (kind, result.stderr)
        assert result.stderr == ""
    # The candidate main.cf the formula checks master.cf against is the same file.
    assert rendered.text("/var/lib/chatmail/postfix-candidate/main.cf") == rendered.text(
        "/etc/postfix/main.cf"
    )


def test_postfix_check_catches_warnings(rendered, tmp_path, test_cert):
    """The check_cmd is able to fail: a typo Postfix only warns about is an error."""
    d = postfix_dir(rendered, tmp_path, *test_cert)
    with open(d / "main.cf", "a") as main:
        main.write("smtpd_tls_security_levle = encrypt\n")
    result = run(
        ["sh", str(CHECK_SCRIPT), "postfix-main", str(d / "master.cf"), str(d / "main.cf")]
    )
    assert result.returncode == 1
    assert "smtpd_tls_security_levle" in result.stderr


def postconf_services(d: Path) -> dict[str, dict[str, str]]:
    """master.cf service name -> its -o overrides, as Postfix parses them."""
    result = run(["postconf", "-c", str(d), "-P"])
    assert result.returncode == 0, result.stderr
    services: dict[str, dict[str, str]] = {}
    for line in result.stdout.splitlines():
        service_type, _, rest = line.partition("/")
        _type, _, setting = rest.partition("/")
        name, _, value = setting.partition(" = ")
        services.setdefault(service_type, {})[name] = value
    return services


def test_postfix_mail_flow(rendered, tmp_path, test_cert):
    m = rendered.map
    s = m["settings"]
    d = postfix_dir(rendered, tmp_path, *test_cert)
    services = postconf_services(d)
    smtp = services["25"]
    assert smtp["smtpd_tls_security_level"] == "encrypt"
    assert smtp["smtpd_proxy_filter"] == f"127.0.0.1:{s['filtermail_smtp_port_incoming']}"
    for port, wrapper in (("587", "no"), ("465", "yes")):
        sub = services[port]
        assert sub["smtpd_proxy_filter"] == f"127.0.0.1:{s['filtermail_smtp_port']}"
        assert sub["smtpd_tls_mandatory_protocols"] == ">=TLSv1.3"
        assert sub["smtpd_tls_wrappermode"] == wrapper
        assert sub["smtpd_sasl_auth_enable"] == "yes"
        assert sub["smtpd_client_connection_count_limit"] == str(s["max_smtp_connections"] // 5)
    reinject = services[f"127.0.0.1:{s['postfix_reinject_port']}"]
    assert reinject["cleanup_service_name"] == "authclean"
    assert reinject["smtpd_milters"] == "unix:opendkim/opendkim.sock"
    assert (
        services[f"127.0.0.1:{s['postfix_reinject_port_incoming']}"]["smtpd_relay_restrictions"]
        == "reject_unauth_destination"
    )

    def main(name: str) -> str:
        result = run(["postconf", "-c", str(d), "-h", name])
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    assert main("message_size_limit") == str(s["max_message_size"])
    assert main("local_transport") == "lmtp:unix:private/dovecot-lmtp"
    assert main("mydestination") == m["mail_domain"]
    assert main("non_smtpd_milters") == "unix:opendkim/opendkim.sock"
    assert main("disable_vrfy_command") == "no"  # VRFY answers 252, as upstream
    assert main("inet_protocols") == ("all" if m["ipv6"] else "ipv4")
    master_text = (d / "master.cf").read_text()
    assert master_text.count(f"{s['max_smtp_connections']}    smtpd") == 3
    # SMTP over 443 (nginx's switch) arrives here with the client's address in a PROXY header
    proxied = services[f"127.0.0.1:{m['ports']['submissions_proxied']}"]
    assert proxied["smtpd_upstream_proxy_protocol"] == "haproxy"
    assert proxied["smtpd_tls_wrappermode"] == "yes"
    assert {
        k: v
        for k, v in proxied.items()
        if k not in ("syslog_name", "smtpd_upstream_proxy_protocol")
    } == {k: v for k, v in services["465"].items() if k != "syslog_name"}


CHROOTED = {"25", "587", "465", "smtp", "relay", "lmtp", "cleanup", "authclean", "pickup",
            "bounce", "showq", "tlsmgr", "anvil"}  # fmt: skip
UNCHROOTED = {"qmgr", "proxymap", "proxywrite", "postlog"}


def test_postfix_services_run_chrooted_as_upstream(rendered, tmp_path, test_cert):
    """Services facing the network or parsing mail run in the queue directory's chroot
    (upstream's master.cf); qmgr, proxymap, postlog and the reinjection listeners do not.
    Whatever they open at run time is relative to the queue directory."""
    d = postfix_dir(rendered, tmp_path, *test_cert)
    result = run(["postconf", "-c", str(d), "-F", "*/*/chroot"])
    assert result.returncode == 0, result.stderr
    chroot = {}
    for line in result.stdout.splitlines():
        service, _, value = line.partition(" = ")
        chroot[service.split("/")[0]] = value
    assert {name for name in CHROOTED if chroot[name] != "y"} == set()
    assert {name for name in UNCHROOTED if chroot[name] != "n"} == set()
    s = rendered.map["settings"]
    for port in (s["postfix_reinject_port"], s["postfix_reinject_port_incoming"]):
        assert chroot[f"127.0.0.1:{port}"] == "n"
    services = postconf_services(d)
    assert (
        services["127.0.0.1:" + str(s["postfix_reinject_port"])].get(
            "smtpd_milters", "unix:opendkim/opendkim.sock"
        )
        == "unix:opendkim/opendkim.sock"
    )  # relative: the same socket inside and outside
    main = run(["postconf", "-c", str(d), "-h", "smtpd_sasl_path", "local_transport"]).stdout
    assert main.split() == ["private/auth", "lmtp:unix:private/dovecot-lmtp"]


@pytest.mark.parametrize(
    ("header", "table", "expected"),
    [
        ("Received: from phone (1.2.3.4)", "submission_header_cleanup", "IGNORE"),
        ("X-Mailer: Delta Chat", "submission_header_cleanup", "IGNORE"),
        ("User-Agent: x", "submission_header_cleanup", "IGNORE"),
        ("X-Originating-IP: 1.2.3.4", "submission_header_cleanup", "IGNORE"),
        ("Subject: secret plans", "submission_header_cleanup", "REPLACE Subject: [...]"),
        ("From: a@b", "submission_header_cleanup", ""),
        ("DKIM-Signature: v=1", "lmtp_header_cleanup", "IGNORE"),
        ("Authentication-Results: x", "lmtp_header_cleanup", "IGNORE"),
        ("Subject: hi", "lmtp_header_cleanup", ""),
    ],
    ids=lambda v: v.split(":")[0] if isinstance(v, str) else v,
)
def test_postfix_header_tables(render, header, table, expected):
    """postmap -q applies the regexp tables exactly as cleanup(8) and lmtp(8) do."""
    path = render("debian12", "example").path(f"/etc/postfix/{table}")
    result = run(["postmap", "-q", header, f"regexp:{path}"])
    assert result.stdout.strip() == expected


@pytest.mark.parametrize(
    ("sender", "owner"), [("alice@x.org", "alice@x.org"), ("a.b-c@[1.2.3.4]", "a.b-c@[1.2.3.4]")]
)
def test_postfix_login_map_is_one_to_one(render, sender, owner):
    path = render("debian12", "example").path("/etc/postfix/login_map")
    assert run(["postmap", "-q", sender, f"regexp:{path}"]).stdout.strip() == owner


def test_postfix_tls_policy(render):
    path = render("debian12", "example").path("/etc/postfix/smtp_tls_policy_map")
    query = lambda domain: run(["postmap", "-q", domain, f"regexp:{path}"]).stdout.strip()
    assert query("_chat.test") == "encrypt"
    assert query("[192.0.2.1]") == "encrypt"
    assert query("example.org") == ""


# -- Dovecot ------------------------------------------------------------------------------


def doveconf_check(rendered, tmp_path, cert, key, trixie_root) -> str:
    m = rendered.map
    text = stand_in(rendered.text("/etc/dovecot/dovecot.conf"), m, cert, key)
    if m["dovecot"]["syntax"] == "2.3":
        conf = tmp_path / "dovecot.conf"
        conf.write_text(text)
        result = run(["doveconf", "-n", "-c", str(conf)])
    else:
        inside = Path("/tmp/chatmail-render") / tmp_path.name
        target = trixie_root / inside.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(cert, target / "cert.pem")
        shutil.copy(key, target / "key.pem")
        text = text.replace(str(cert), str(inside / "cert.pem")).replace(
            str(key), str(inside / "key.pem")
        )
        (target / "dovecot.conf").write_text(text)
        try:
            result = subprocess.run(
                ["chroot", str(trixie_root), "doveconf", "-n", "-c", str(inside / "dovecot.conf")],
                check=False,
                capture_output=True,
                text=True,
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        finally:
            shutil.rmtree(target, ignore_errors=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    return result.stdout


def test_dovecot_passes_doveconf(rendered, tmp_path, test_cert, request):
    trixie_root = (
        request.getfixturevalue("trixie_root")
        if rendered.map["dovecot"]["syntax"] == "2.4"
        else None
    )
    out = doveconf_check(rendered, tmp_path, *test_cert, trixie_root)
    m = rendered.map
    s = m["settings"]
    if m["dovecot"]["syntax"] == "2.4":
        # a boolean list adding to the defaults ("+..." would replace them, IMAP4rev1 too)
        assert re.search(r"imap_capability \{\s+XDELTAPUSH = yes\s+XCHATMAIL = yes\s+\}", out)
    else:
        assert "imap_capability = +XDELTAPUSH XCHATMAIL" in out
    assert f"{m['paths']['mailboxes']}/%" in out
    assert "chatmail-quota-expire" in out
    assert str(s["max_imap_connections"]) in out
    assert "port = 9900" in out
    # IMAP over 443: a loopback listener that reads nginx's PROXY header
    assert re.search(r"inet_listener imaps_proxied \{[^}]*haproxy = yes[^}]*\}", out), out
    assert re.search(r"haproxy_trusted_networks = 127\.0\.0\.1(/32)?\n", out)
    if s.get("privacy_mail"):
        assert f"mail_server_admin = mailto:{s['privacy_mail']}" in out
    if m["dovecot"]["syntax"] == "2.3":
        assert f"quota_rule = *:storage={m['dovecot']['quota_mb']}M" in out
        assert "auth-dict.conf.ext" in out
    else:
        assert f"storage_size = {m['dovecot']['quota_mb']}M" in out
        assert "auth-doveauth.lua" in out
    assert ("imap_hibernate_timeout = 30" in out) is (not s["imap_compress"])
    # mail files upstream stored gz-compressed are read, and new ones stored the same way
    if m["dovecot"]["syntax"] == "2.3":
        assert re.search(r"^mail_plugins = .*\bzlib\b", out, re.MULTILINE), out
        assert "zlib_save = gz" in out
    else:
        assert re.search(r"mail_plugins \{[^}]*mail_compress = yes", out), out
        assert "mail_compress_write_method = gz" in out


def test_dovecot_stores_raw_when_compression_is_off(render, tmp_path, test_cert):
    """mail_compress "" stores new mail raw; the plugin still reads compressed files."""
    pillar = _example_pillar()
    pillar["chatmail"]["dovecot"]["mail_compress"] = ""
    rendered = render("debian12", "raw-mail", pillar)
    out = doveconf_check(rendered, tmp_path, *test_cert, None)
    assert "zlib_save" not in out
    assert re.search(r"^mail_plugins = .*\bzlib\b", out, re.MULTILINE), out


def test_dovecot_quota_is_parsed_like_chatmaild(render):
    assert render("debian12", "example").map["dovecot"]["quota_mb"] == 500
    assert render("debian12", "underscore").map["dovecot"]["quota_mb"] == 2048


def test_dovecot_auth_dict_keys(render):
    text = render("debian12", "example").text("/etc/dovecot/auth-dict.conf.ext")
    assert 'password_key = passdb/%Ew"%Eu' in text
    assert "user_key = userdb/%Eu" in text
    assert "uri = proxy:/run/doveauth/doveauth.socket:auth" in text


# -- nginx --------------------------------------------------------------------------------


def test_nginx_passes_nginx_t(rendered, tmp_path, test_cert):
    m = rendered.map
    conf = tmp_path / "nginx.conf"
    conf.write_text(stand_in(rendered.text("/etc/nginx/nginx.conf"), m, *test_cert))
    result = run(["nginx", "-q", "-t", "-c", str(conf)])
    assert result.returncode == 0, result.stderr
    dump = run(["nginx", "-q", "-T", "-c", str(conf)]).stdout
    assert dump.count("access_log") == 1
    assert "ssl_preread on;" in dump
    p = m["ports"]
    # the 443 switch passes the client's address to every upstream (PROXY header)
    assert f"~\\bimap\\b 127.0.0.1:{p['imaps_proxied']};" in dump
    assert f"~\\bsmtp\\b 127.0.0.1:{p['submissions_proxied']};" in dump
    assert "proxy_protocol on;" in dump
    assert dump.count(f"listen 127.0.0.1:{p['https_internal']} ssl proxy_protocol") == 2
    assert "set_real_ip_from 127.0.0.1;" in dump and "real_ip_header proxy_protocol;" in dump
    assert f"proxy_pass http://127.0.0.1:{m['api']['port']};" in dump
    assert ("[::]:443" in dump) is m["ipv6"]
    # /new is rate-limited per client (an IPv6 client per /64) in every TLS mode
    assert "limit_req_zone $chatmail_new_client zone=newaccount" in dump
    assert "limit_req zone=newaccount" in dump
    if m["tls"]["mode"] == "self":
        assert "dcaccount:" not in dump
    else:
        assert f"return 301 dcaccount:https://{m['mail_domain']}/new;" in dump


def test_autoconfig_and_mta_sts(rendered):
    import xml.etree.ElementTree as ET

    m = rendered.map
    root = ET.fromstring(rendered.text("/var/lib/chatmail/wellknown/config-v1.1.xml"))
    incoming = {
        (s.find("port").text, s.find("socketType").text) for s in root.iter("incomingServer")
    }
    outgoing = {
        (s.find("port").text, s.find("socketType").text) for s in root.iter("outgoingServer")
    }
    assert incoming == {("993", "SSL"), ("143", "STARTTLS"), ("443", "SSL")}
    assert outgoing == {("465", "SSL"), ("587", "STARTTLS"), ("443", "SSL")}
    assert {h.text for h in root.iter("hostname")} == {m["mail_domain"]}
    sts = rendered.text("/var/lib/chatmail/wellknown/mta-sts.txt")
    assert sts.splitlines() == [
        "version: STSv1",
        "mode: enforce",
        f"mx: {m['mail_domain']}",
        "max_age: 2419200",
    ]


# -- unbound, OpenDKIM, systemd units -----------------------------------------------------


def test_unbound_passes_checkconf(rendered, tmp_path):
    m = rendered.map
    conf = tmp_path / "chatmail.conf"
    conf.write_text(rendered.text("/etc/unbound/unbound.conf.d/chatmail.conf"))
    result = run(["unbound-checkconf", str(conf)])
    assert result.returncode == 0, result.stdout + result.stderr
    text = conf.read_text()
    if m["dns_forwarder"]:
        assert f"forward-addr: {m['dns_forwarder']}" in text
        assert 'module-config: "iterator"' in text  # no DNSSEC validation of forwarded answers
    else:
        assert "forward-zone" not in text
    assert rendered.text("/etc/resolv.conf").strip().endswith("nameserver 127.0.0.1")


def test_opendkim_passes_config_check(rendered, tmp_path):
    m = rendered.map
    key_dir = m["dkim"]["key_dir"]
    local = tmp_path / "dkimkeys"
    local.mkdir()
    for name in ("KeyTable", "SigningTable"):
        (local / name).write_text(rendered.text(f"{key_dir}/{name}").replace(key_dir, str(local)))
    conf = tmp_path / "opendkim.conf"
    conf.write_text(rendered.text("/etc/opendkim.conf").replace(key_dir, str(local)))
    result = run(["opendkim", "-n", "-x", str(conf)])
    assert result.returncode == 0, result.stderr
    d = m["mail_domain"]
    assert (local / "SigningTable").read_text().strip() == f"*@{d} opendkim._domainkey.{d}"
    assert f"opendkim._domainkey.{d} {d}:opendkim:" in (local / "KeyTable").read_text()


def unit_files(rendered) -> dict[str, str]:
    return {
        name: name.rsplit("/", 1)[1]
        for name in rendered.files
        if name.startswith("/etc/systemd/system/")
        and "/" not in name[len("/etc/systemd/system/") :]
    }


def test_units_pass_systemd_analyze(rendered, tmp_path, fake_venv):
    m = rendered.map
    units = unit_files(rendered)
    assert {f"{d}.service" for d in DAEMONS} | {
        "chatmail-expire.service",
        "chatmail-expire.timer",
    } <= set(units.values())
    # Every rendered unit is on the unit path, as on the relay (a .socket needs its service).
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for name, unit in units.items():
        text = rendered.text(name).replace(m["paths"]["venv"], str(fake_venv))
        # Programs of packages the host lacks (acmetool, certbot) are stood in too.
        text = re.sub(
            r"^(ExecStart=)(/\S+)",
            lambda g: g[1] + (g[2] if Path(g[2]).exists() else str(fake_venv / "bin" / "python")),
            text,
            flags=re.MULTILINE,
        )
        (unit_dir / unit).write_text(text)
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}
    for unit in units.values():
        result = run(["sh", str(CHECK_SCRIPT), "unit", unit, str(unit_dir / unit)], env=env)
        assert result.returncode == 0, f"{unit}: {result.stdout}{result.stderr}"


# the distro daemons that get a limits drop-in, per map: key in chatmail.limits -> unit
def distro_daemons(m: dict) -> dict[str, str]:
    daemons = {"dovecot": "dovecot.service", "unbound": "unbound.service"}
    if m["mta"] == "postfix":
        daemons["postfix"] = "postfix@.service"
    else:
        daemons["opensmtpd"] = "opensmtpd.service"
    if m["web"]["server"] == "nginx":
        daemons["nginx"] = "nginx.service"
    if m["dkim"]["enabled"] and m["dkim"]["signer"] == "opendkim":
        daemons["opendkim"] = "opendkim.service"
    return daemons


def test_every_service_has_ceilings(rendered, tmp_path):
    """Every service the relay runs has MemoryMax and TasksMax from chatmail.limits: our
    units in the unit, the distro daemons in a drop-in whose lines systemd accepts."""
    m = rendered.map
    services = [name for name in unit_files(rendered) if name.endswith(".service")]
    assert len(services) >= 8
    for name in services:
        text = rendered.text(name)
        limit = m["limits"][name.rsplit("/", 1)[1].removesuffix(".service")]
        assert f"\nMemoryMax={limit['memory']}\n" in text, name
        assert f"\nTasksMax={limit['tasks']}\n" in text, name
    for key, unit in distro_daemons(m).items():
        dropin = f"/etc/systemd/system/{unit}.d/20-chatmail-limits.conf"
        lines = rendered.text(dropin).split("[Service]\n", 1)[1]
        assert lines.splitlines()[:2] == [
            f"MemoryMax={m['limits'][key]['memory']}",
            f"TasksMax={m['limits'][key]['tasks']}",
        ]
        candidate = tmp_path / f"limits-{key}.service"
        candidate.write_text(f"[Service]\nExecStart=/bin/true\n{lines}")
        result = run(["sh", str(CHECK_SCRIPT), "unit", candidate.name, str(candidate)])
        assert result.returncode == 0, f"{dropin}: {result.stdout}{result.stderr}"


def test_missing_limit_fails_loudly(render):
    pillar = {"chatmail": {"mail_domain": "x.example", "limits": {"doveauth": None}}}
    with pytest.raises(RenderError, match="limits:doveauth is missing"):
        render("debian12", "nolimit", pillar=pillar)


def test_unit_check_catches_errors(tmp_path):
    candidate = tmp_path / "candidate"
    candidate.write_text("[Service]\nExecStart=/nonexistent/binary\nRestart=sometimes\n")
    result = run(["sh", str(CHECK_SCRIPT), "unit", "broken.service", str(candidate)])
    assert result.returncode == 1
    assert "broken.service" in result.stderr


def test_daemon_units_are_sandboxed(rendered):
    m = rendered.map
    for daemon in DAEMONS:
        text = rendered.text(f"/etc/systemd/system/{daemon}.service")
        for line in (
            "User=vmail",
            "Restart=always",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
            f"ReadWritePaths={m['paths']['counters']}",
        ):
            assert line in text, (daemon, line)
        assert re.search(rf"^ExecStart={re.escape(m['paths']['venv'])}/bin/", text, re.MULTILINE)
    assert "ProtectHome=yes" in rendered.text("/etc/systemd/system/filtermail.service")
    # the queue helper alone: Debian 13's postsuper cannot switch to the mail owner under it
    assert "NoNewPrivileges=yes" in rendered.text("/etc/systemd/system/chatmail-adminctl-accounts.service")
    assert "NoNewPrivileges=no" in rendered.text("/etc/systemd/system/chatmail-adminctl-queue.service")
    expire = rendered.text("/etc/systemd/system/chatmail-expire.service")
    assert f"chatmail-expire {m['paths']['ini']} --remove" in expire
    assert "Type=oneshot" in expire


def test_every_checked_file_is_validated_here(rendered):
    """Each config the formula validates on the relay is also validated by a test above."""
    covered = re.compile(
        r"^/etc/(postfix/(main|master)\.cf|dovecot/dovecot\.conf|nginx/nginx\.conf|"
        r"unbound/unbound\.conf\.d/chatmail\.conf|opendkim\.conf|systemd/system/[^/]+)$"
        r"|^/usr/local/lib/chatmaild/chatmail\.ini$"
    )
    checked = [name for name, f in rendered.files.items() if f["check_cmd"]]
    assert checked
    assert [name for name in checked if not covered.match(name)] == []


SUB_STATES = (
    "chatmail.users",
    "chatmail.packages",
    "chatmail.tls",
    "chatmail.chatmaild",
    "chatmail.dkim",
    "chatmail.dovecot",
    "chatmail.mta",
    "chatmail.web",
    "chatmail.resolver",
    "chatmail.expiry",
    "chatmail.checks",
    "chatmail.limits",
    "chatmail.api.stats",
    "chatmail.api.daemon",
    "chatmail.turn",
    "chatmail.upstream",
)


@pytest.mark.parametrize("pillar", ["example", "underscore"])
def test_each_sub_state_compiles_alone(render, pillar):
    """`state.apply chatmail.<concern>` works on its own: it includes what it requires."""
    rendered = render("debian12", pillar, standalone=SUB_STATES)
    failures = {sls: r for sls, r in rendered.standalone.items() if isinstance(r, dict)}
    assert failures == {}
    assert set(rendered.standalone) == set(SUB_STATES)


# -- pillar.example -----------------------------------------------------------------------


@pytest.mark.parametrize("platform", PLATFORMS)
def test_pillar_example_restates_the_defaults(render, platform):
    """pillar.example shows defaults only: applied as a pillar it changes nothing, on any
    OS (per-OS keys are commented out there), and it names no key the map lacks."""
    example = render(platform, "example").map
    minimal = render(
        platform, "minimal", pillar={"chatmail": {"mail_domain": "chat.example.org"}}
    ).map
    differing = sorted(k for k in set(example) | set(minimal) if example.get(k) != minimal.get(k))
    assert differing == []


def test_pillar_example_documents_every_ini_setting():
    active = set(_example_pillar()["chatmail"]["settings"])
    text = (REPO / "pillar.example").read_text()
    commented = {k for k in Config.model_fields if re.search(rf"^\s+# {k}: ", text, re.MULTILINE)}
    assert set(Config.model_fields) - DERIVED == active | commented
    assert not active & DERIVED


# -- Debian 13's own validators -------------------------------------------------------------


def test_debian13_nginx_and_unbound_pass_trixie_validators(render, trixie_root, test_cert):
    """nginx 1.26 and unbound of Debian 13 accept what the formula renders for Debian 13."""
    for pillar in ("example", "underscore"):
        rendered = render("debian13", pillar)
        inside = Path("/tmp/chatmail-render") / f"web-{pillar}-{os.getpid()}"
        target = trixie_root / inside.relative_to("/")
        target.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copy(test_cert[0], target / "cert.pem")
            shutil.copy(test_cert[1], target / "key.pem")
            nginx = stand_in(
                rendered.text("/etc/nginx/nginx.conf"),
                rendered.map,
                inside / "cert.pem",
                inside / "key.pem",
            )
            (target / "nginx.conf").write_text(nginx)
            (target / "unbound.conf").write_text(
                rendered.text("/etc/unbound/unbound.conf.d/chatmail.conf")
            )
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
            for cmd in (
                ["nginx", "-q", "-t", "-c", str(inside / "nginx.conf")],
                ["unbound-checkconf", str(inside / "unbound.conf")],
            ):
                result = subprocess.run(
                    ["chroot", str(trixie_root), *cmd],
                    check=False,
                    capture_output=True,
                    text=True,
                    env=env,
                )
                assert result.returncode == 0, (pillar, cmd[0], result.stdout, result.stderr)
        finally:
            shutil.rmtree(target, ignore_errors=True)


def dovecot_plugins(conf: str, syntax: str) -> set[str]:
    """Plugins the config loads: 2.3 `mail_plugins = ...`, 2.4 `mail_plugins { x = yes }`."""
    if syntax == "2.3":
        words = re.findall(r"^\s*mail_plugins\s*=\s*(.*)$", conf, flags=re.MULTILINE)
        return {w for line in words for w in line.split() if not w.startswith("$")}
    blocks = re.findall(r"mail_plugins\s*\{([^}]*)\}", conf)
    return {m for block in blocks for m in re.findall(r"^\s*(\w+)\s*=\s*yes", block, re.MULTILINE)}


def test_dovecot_plugins_exist(rendered, request):
    """doveconf does not load plugins: check the package ships every one the config names."""
    syntax = rendered.map["dovecot"]["syntax"]
    modules = Path("/usr/lib/dovecot/modules")
    if syntax == "2.4":
        modules = request.getfixturevalue("trixie_root") / "usr/lib/dovecot/modules"
    shipped = {re.sub(r"^lib\d+_(.*)_plugin\.so$", r"\1", p.name) for p in modules.iterdir()}
    wanted = dovecot_plugins(rendered.text("/etc/dovecot/dovecot.conf"), syntax)
    assert {"quota", "imap_quota", "last_login", "mail_lua", "push_notification_lua"} <= wanted
    assert wanted & {"zlib", "mail_compress"}
    assert wanted - shipped == set()


# -- brute-force throttling of failed logins ------------------------------------------------


def test_failed_logins_are_throttled(rendered, tmp_path, test_cert, request):
    """Dovecot delays failed logins and keeps its per-address penalty; Postfix limits AUTH
    per client address (anvil). Values from the map's auth_throttle, one place."""
    m = rendered.map
    throttle = m["auth_throttle"]
    assert throttle["penalty"] and throttle["failure_delay"] not in ("0", 0)
    conf = rendered.text("/etc/dovecot/dovecot.conf")
    assert f"\nauth_failure_delay = {throttle['failure_delay']}\n" in conf
    trixie_root = (
        request.getfixturevalue("trixie_root") if m["dovecot"]["syntax"] == "2.4" else None
    )
    assert "anvil-auth-penalty" not in doveconf_check(rendered, tmp_path, *test_cert, trixie_root)

    d = postfix_dir(rendered, tmp_path, *test_cert)
    for name, value in (
        ("smtpd_client_auth_rate_limit", str(throttle["smtp_auth_per_minute"])),
        ("anvil_rate_time_unit", "60s"),
    ):
        result = run(["postconf", "-c", str(d), "-h", name])
        assert result.returncode == 0 and result.stdout.strip() == value, (name, result)
    anvil = run(["postconf", "-c", str(d), "-M", "anvil/unix"])
    assert anvil.returncode == 0 and anvil.stdout.split()[-1] == "anvil", anvil


@pytest.mark.parametrize("platform", ["debian12", "debian13"])
def test_auth_penalty_can_be_turned_off(render, tmp_path, test_cert, request, platform):
    pillar = PILLARS["example"]()
    pillar["chatmail"]["auth_throttle"] = {"penalty": False, "failure_delay": "0"}
    rendered = render(platform, "no-penalty", pillar=pillar)
    trixie_root = request.getfixturevalue("trixie_root") if platform == "debian13" else None
    out = doveconf_check(rendered, tmp_path, *test_cert, trixie_root)
    assert re.search(r"unix_listener anvil-auth-penalty \{\s+mode = 0+\s+\}", out), out


def test_postfix_header_tables_are_the_filters_list(render):
    """Postfix's maps are rendered from the list the OpenSMTPD filter applies itself."""
    from chatmaild.policy import load_header_cleanup

    rendered = render("debian12", "example")
    for table, stage in (("submission_header_cleanup", "submission"),
                         ("lmtp_header_cleanup", "delivery")):  # fmt: skip
        cleanup = load_header_cleanup()[stage]
        path = rendered.path(f"/etc/postfix/{table}")
        query = lambda header, path=path: run(
            ["postmap", "-q", header, f"regexp:{path}"]
        ).stdout.strip()
        for name in cleanup.drop:
            assert query(f"{name.title()}: x") == "IGNORE", (table, name)
        for name, line in cleanup.replace.items():
            assert query(f"{name.upper()}: x") == f"REPLACE {line}", (table, name)
        assert query("From: a@b") == ""
