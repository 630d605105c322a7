"""mta: opensmtpd, rendered: the map switches (DKIM by filter-dkimsign, no Postfix, no
OpenDKIM daemon), smtpd.conf passes Debian 13's ``smtpd -n`` (OpenSMTPD 7.6.0p1) for
Debian 13 and OpenBSD, and it states the relay's policy. The same config running for
real is test_opensmtpd_live.py.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from opensmtpd_support import smtpd_check
from saltsupport import OPENBSD_GRAINS, PILLARS, PLATFORMS, RenderError
from test_render import stand_in

pytestmark = pytest.mark.skipif(
    subprocess.run(["id", "-u"], check=False, capture_output=True, text=True).stdout.strip() != "0",
    reason="needs root: chroot, overlay mount",
)

CASES = {
    "debian13-example": ("debian13", "example"),
    "debian13-underscore": ("debian13", "underscore"),
    "openbsd-example": ("openbsd7", "example"),
    "openbsd-underscore": ("openbsd7", "underscore"),
}


def opensmtpd_pillar(name: str) -> dict:
    pillar = PILLARS[name]()
    pillar["chatmail"]["mta"] = "opensmtpd"
    return pillar


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def rendered(request, render):
    platform, pillar = CASES[request.param]
    grains = OPENBSD_GRAINS if platform == "openbsd7" else PLATFORMS[platform]
    return render(platform, pillar, pillar=opensmtpd_pillar(pillar), grains=grains)


def smtpd_conf(rendered) -> str:
    return rendered.text(rendered.map["opensmtpd"]["config"])


def state_args(rendered, sid: str) -> dict:
    body = rendered.states[sid]
    return {
        k: v
        for args in body.values()
        for arg in args
        if isinstance(arg, dict)
        for k, v in arg.items()
    }


def test_map_switches_with_the_mta(rendered):
    m = rendered.map
    assert m["mta"] == "opensmtpd"
    assert m["dkim"]["signer"] == "filter-dkimsign"
    assert m["users"]["opendkim"] == "_dkimsign"
    packages = state_args(rendered, "chatmail-packages")["pkgs"]
    assert "opensmtpd-filter-dkimsign" in packages
    assert "postfix" not in packages
    # Debian: OpenDKIM's tools only (opendkim-genkey makes the key); OpenBSD has no split
    # package, so opendkim is installed but its daemon never configured nor started
    assert "opendkim" not in packages or rendered.map["init"] == "rcctl"


def test_no_postfix_and_no_opendkim_daemon(rendered):
    ids = set(rendered.states)
    assert "chatmail-mta-service" in ids and "chatmail-mta-table" in ids
    assert not {i for i in ids if i.startswith(("chatmail-mta-main", "chatmail-mta-master"))}
    assert "chatmail-dkim-service" not in ids
    assert "chatmail-dkim-key" in ids  # the key filter-dkimsign signs with
    assert not [name for name in rendered.files if "postfix" in name]
    # filtermail's rules run inside smtpd: its daemons are not installed, and stopped
    for daemon in ("filtermail", "filtermail-incoming"):
        assert rendered.map["daemons"][daemon] is False
        assert "dead" in rendered.states[f"chatmail-chatmaild-{daemon}-service"]["service"]
        assert "absent" in rendered.states[f"chatmail-chatmaild-{daemon}-unit"]["file"]
    assert rendered.map["daemons"]["doveauth"] is True


def test_smtpd_conf_passes_smtpd_n(rendered, trixie_root, tmp_path, test_cert):
    m = rendered.map
    result = smtpd_check(trixie_root, tmp_path, smtpd_conf(rendered), test_cert,
                         libexec=m["opensmtpd"]["libexec"])  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "configuration OK" in result.stdout + result.stderr


def test_smtpd_conf_catches_mistakes(rendered, trixie_root, tmp_path, test_cert):
    """The check is real: a rule naming an undeclared action fails it."""
    broken = smtpd_conf(rendered) + 'match from any for any action "nowhere"\n'
    result = smtpd_check(trixie_root, tmp_path, broken, test_cert)
    assert result.returncode != 0


def listeners(conf: str) -> dict[str, str]:
    """tag -> the listen lines carrying it (joined)."""
    found: dict[str, list[str]] = {}
    for line in conf.splitlines():
        tag = re.search(r'tag "([^"]+)"', line)
        if line.startswith("listen on") and tag:
            found.setdefault(tag.group(1), []).append(line)
    return {tag: "\n".join(lines) for tag, lines in found.items()}


def test_smtpd_conf_policy(rendered):
    m = rendered.map
    s, d, ports = m["settings"], m["mail_domain"], m["ports"]
    conf = smtpd_conf(rendered)
    by_tag = listeners(conf)
    # 25: STARTTLS required, no AUTH, not signed
    inbound = by_tag["inbound"]
    assert f"port {ports['smtp']} tls-require" in inbound
    assert "auth" not in inbound and "dkimsign" not in inbound
    # 587/465: TLS, AUTH against the account table, MAIL FROM = login
    submission = by_tag["submission"].splitlines()
    assert any(f"port {ports['submission']} tls-require" in line for line in submission)
    assert any(f"port {ports['submissions']} smtps" in line for line in submission)
    assert all("auth <chatmail> senders <chatmail>" in line for line in submission)
    assert all('protocols "tlsv1.3"' in line for line in submission)
    # filtermail's rules as smtpd filters (no relay hop, no reinjection listeners); the
    # submission chain signs after chatmail-out, the bounces are signed too
    assert 'filter "chatmail-in"' in inbound
    assert all('filter "submission"' in line for line in submission)
    assert 'filter "submission" chain { "chatmail-out", "dkimsign" }' in conf
    mxdeliv = m["daemons"]["mxdeliv"]
    assert set(by_tag) == {"inbound", "submission", "own"} | ({"mxdeliv"} if mxdeliv else set())
    assert f"port {s['postfix_reinject_port']}" not in conf
    if mxdeliv:
        # POST /mxdeliv reinjects on loopback through the port-25 filter, our domain only
        assert by_tag["mxdeliv"] == (
            f"listen on 127.0.0.1 port {s['postfix_reinject_port_incoming']}"
            ' filter "chatmail-in" tag "mxdeliv"'
        )
        assert f'match from local tag "mxdeliv" for domain "{d}" rcpt-to <chatmail> action "local"' in conf
    assert 'listen on socket filter "dkimsign"' in conf
    venv, ini, u = m["paths"]["venv"], m["paths"]["ini"], m["users"]
    for name, mode in (("chatmail-in", "incoming"), ("chatmail-out", "outgoing")):
        assert (
            f'filter "{name}" proc-exec "{venv}/bin/chatmail-smtpd-filter {ini} {mode}" '
            f"user {u['vmail']} group {u['vmail_group']}"
        ) in conf
    # every public listener binds what the map says, IPv6 only when enabled
    addresses = {
        line.split()[2]
        for line in conf.splitlines()
        if re.search(r'tag "(inbound|submission)"', line)
    }
    assert ("::" in addresses) is m["ipv6"]
    # actions: LMTP, verified TLS outbound; no relay to filtermail
    assert "smtp+notls" not in conf
    assert f'lmtp "{m["opensmtpd"]["lmtp_socket"]}" rcpt-to virtual <virtuals>' in conf
    assert re.search(r'action "outbound" relay tls helo', conf)
    # the internet reaches only our domain
    inbound_rules = [
        line for line in conf.splitlines() if line.startswith("match") and '"inbound"' in line
    ]
    assert inbound_rules == [
        f'match from any tag "inbound" for domain "{d}" rcpt-to <chatmail> action "local"'
    ]
    # our domain: existing accounts only, everywhere; unknown ones are never relayed
    rules = [line for line in conf.splitlines() if line.startswith("match")]
    for rule in rules:
        if 'action "local"' in rule:
            assert f'for domain "{d}" rcpt-to <chatmail>' in rule
        else:
            assert f'! for domain "{d}"' in rule or "! rcpt-to <ourdomain>" in rule
    assert f'table ourdomain {{ "@{d}" }}' in conf
    assert f"-d {d} -s {m['dkim']['selector']} -k {m['dkim']['key_dir']}/" in conf
    # off by default: other domains' mail leaves over SMTP, no HTTPS-first transport; mail
    # queued for it while it was on leaves over SMTP too (no rule names it)
    assert m["daemons"]["mxtransport"] is False
    assert f'action "mxtransport" relay tls helo "{d}"' in conf
    assert not [r for r in rules if 'action "mxtransport"' in r]
    assert "smtp_channel" not in conf and "transport_user" not in conf


def test_only_self_signed_relays_get_unverified_tls(rendered):
    """_-domains and IP literals (an IP-address relay, user@[203.0.113.7]) have self-signed
    certificates: STARTTLS without verification, as Postfix's smtp_tls_policy_map. The
    lab proves it against a real IP relay (tests/lab/test_fleet.py, relay2->relay4)."""
    conf = smtpd_conf(rendered)
    regexes = set(re.findall(r'for domain regex "([^"]+)" .*action "outbound_noverify"', conf))
    (regex,) = regexes  # POSIX ERE; this one means the same in Python's re
    for domain in ("_relay3.lab.example", "[203.0.113.7]"):
        assert re.search(regex, domain), (regex, domain)
    for domain in ("relay1.lab.example", "a_b.example", "203.0.113.7.example"):
        assert not re.search(regex, domain), (regex, domain)


def test_table_wrapper_matches_the_doas_rule(rendered, tmp_path):
    m = rendered.map
    wrapper_name = f"{m['opensmtpd']['libexec']}/table-chatmail"
    wrapper = rendered.text(wrapper_name)
    assert wrapper.startswith("#!/bin/sh\n")
    check = tmp_path / "table-chatmail"
    check.write_text(wrapper)
    assert subprocess.run(["sh", "-n", str(check)], check=False).returncode == 0
    rule = state_args(rendered, "chatmail-mta-doas")["content"].strip()
    permit = re.fullmatch(r"permit nopass (\S+) as (\S+) cmd (\S+) args (.+)", rule)
    assert permit, rule
    user, target, cmd, args = permit.groups()
    assert user == m["opensmtpd"]["user"] and target == m["users"]["vmail"]
    exec_line = next(line for line in wrapper.splitlines() if line.startswith("exec "))
    # what the wrapper runs, with smtpd's one argument (the ini) filled in
    assert exec_line.replace('"$1"', m["paths"]["ini"]) == (
        f"exec {m['opensmtpd']['doas']} -u {target} {cmd} {args}"
    )
    assert f'table chatmail "chatmail:{m["paths"]["ini"]}"' in smtpd_conf(rendered)


def test_senders_table_maps_an_account_to_itself(make_relaxed_config):
    """``senders <chatmail>``: smtpd looks the login up as a mailaddrmap; an account may
    send as itself only, and unknown names map to nothing."""
    from chatmaild.smtpdtable import ChatmailTable

    table = ChatmailTable(make_relaxed_config("chat.example"), ("auth", "mailaddrmap"))
    head = "table|0.1|1713795082.354255|chatmail"
    assert table.reply(f"{head}|check|auth|a1|alice1234@chat.example:correct-horse-1") == (
        "check-result|a1|found\n"
    )
    assert table.reply(f"{head}|lookup|mailaddrmap|b2|alice1234@chat.example") == (
        "lookup-result|b2|found|alice1234@chat.example\n"
    )
    assert table.reply(f"{head}|lookup|mailaddrmap|c3|bob123456@chat.example") == (
        "lookup-result|c3|not-found\n"
    )
    assert table.reply(f"{head}|lookup|mailaddrmap|d4|alice1234@other.example") == (
        "lookup-result|d4|not-found\n"
    )


@pytest.mark.parametrize("platform", ["debian12", "ubuntu2404"])
def test_too_old_opensmtpd_fails_loudly(render, platform):
    """Debian 12 (6.8) and Ubuntu 24.04 (7.4) lack the table protocol and filter-dkimsign."""
    with pytest.raises(RenderError, match="needs OpenSMTPD 7.6"):
        render(platform, "example", pillar=opensmtpd_pillar("example"))


def test_without_dkim_submission_runs_chatmail_out_only(render):
    pillar = opensmtpd_pillar("example")
    pillar["chatmail"]["dkim"] = {"enabled": False}
    rendered = render("debian13", "example-nodkim", pillar=pillar)
    conf = smtpd_conf(rendered)
    assert "dkimsign" not in conf and "chain" not in conf
    by_tag = listeners(conf)
    assert all('filter "chatmail-out"' in line for line in by_tag["submission"].splitlines())
    assert by_tag["own"] == 'listen on socket tag "own"'


@pytest.mark.parametrize("pillar_name", ["example", "underscore"])
def test_nginx_hop_drops_the_proxy_header_for_smtpd(render, pillar_name, tmp_path, test_cert):
    """OpenSMTPD reads only PROXY v2 and nginx sends v1: SMTP over 443 goes through a
    stream hop that takes the header off, to smtpd's own port 465. (OpenBSD has relayd,
    no ALPN switch.)"""
    rendered = render("debian13", pillar_name, pillar=opensmtpd_pillar(pillar_name))
    m = rendered.map
    assert m["web"]["server"] == "nginx"
    p = m["ports"]
    conf = tmp_path / "nginx.conf"
    conf.write_text(stand_in(rendered.text("/etc/nginx/nginx.conf"), m, *test_cert))
    result = subprocess.run(
        ["nginx", "-q", "-T", "-c", str(conf)], check=False, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    hop = re.search(
        rf"listen 127\.0\.0\.1:{p['submissions_proxied']} proxy_protocol;\s*"
        rf"proxy_pass 127\.0\.0\.1:{p['submissions']};",
        result.stdout,
    )
    assert hop, result.stdout


# --- daemons:mxtransport: other domains' mail HTTPS first, then SMTP ---------------------

HTTPS_CASES = {
    "debian13-example": ("debian13", "example"),
    "openbsd-underscore": ("openbsd7", "underscore"),
}


@pytest.fixture(scope="module", params=list(HTTPS_CASES), ids=list(HTTPS_CASES))
def https_first(request, render):
    platform, name = HTTPS_CASES[request.param]
    pillar = opensmtpd_pillar(name)
    pillar["chatmail"]["daemons"] = {"mxtransport": True}
    grains = OPENBSD_GRAINS if platform == "openbsd7" else PLATFORMS[platform]
    return render(platform, f"{name}-mxtransport", pillar=pillar, grains=grains)


def test_https_first_conf_passes_smtpd_n(https_first, trixie_root, tmp_path, test_cert):
    conf = smtpd_conf(https_first)
    assert 'action "mxtransport"' in conf
    result = smtpd_check(trixie_root, tmp_path, conf, test_cert,
                         libexec=https_first.map["opensmtpd"]["libexec"])  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_https_first_hands_other_domains_to_the_transport(https_first):
    """Submitted mail and bounces for other domains go to chatmail-mxtransport over LMTP;
    what it hands back on the loopback SMTP channel leaves over SMTP with the TLS policy
    of the default config, and never goes to the transport again (no loop)."""
    m = https_first.map
    s, d, o = m["settings"], m["mail_domain"], m["opensmtpd"]
    conf = smtpd_conf(https_first)
    assert m["daemons"]["mxtransport"] is True
    assert "dead" not in https_first.states["chatmail-chatmaild-mxtransport-service"]["service"]
    unit = https_first.text(state_args(https_first, "chatmail-chatmaild-mxtransport-unit")["name"])
    assert "/bin/chatmail-mxtransport" in unit
    assert f"{m['paths']['ini']} --mta opensmtpd" in unit  # refusals over SMTP (smtpd 7.6)
    assert listeners(conf)["smtp_channel"] == (
        f'listen on {s["postfix_host"]} port {s["postfix_reinject_port_smtp"]} tag "smtp_channel"'
    )  # no filter: judged and signed when it first entered
    # smtpd's LMTP delivery agent, one recipient per transaction, as smtpd's own user
    assert (
        f'action "mxtransport" lmtp "{s["filtermail_host"]}:'
        f'{s["filtermail_lmtp_port_transport"]}" rcpt-to virtual <transport_user>'
    ) in conf
    assert f'table transport_user {{ "@" = "{o["user"]}" }}' in conf
    rules = [line for line in conf.splitlines() if line.startswith("match")]
    leaving = [r for r in rules if 'action "local"' not in r]
    assert leaving == [
        f'match from any auth tag "submission" ! for domain "{d}" action "mxtransport"',
        f'match from local tag "own" ! for domain "{d}" action "mxtransport"',
        f'match from local tag "smtp_channel" for domain regex "{o["noverify_domain_regex"]}"'
        ' ! rcpt-to <ourdomain> action "outbound_noverify"',
        f'match from local tag "smtp_channel" ! for domain "{d}" action "outbound"',
    ]
    # our domain is delivered locally before any of these (first match wins)
    assert rules.index(leaving[0]) > max(
        i for i, r in enumerate(rules) if 'action "local"' in r
    )
    # the fallback channel keeps the TLS policy of the default config
    assert re.search(rf'action "outbound" relay tls helo "{re.escape(d)}"', conf)
    noverify = rf'action "outbound_noverify" relay tls no-verify helo "{re.escape(d)}"'
    assert re.search(noverify, conf)


def test_https_first_on_openbsd_renders_an_rc_d_script(render, tmp_path):
    pillar = opensmtpd_pillar("underscore")
    pillar["chatmail"]["daemons"] = {"mxtransport": True}
    rendered = render("openbsd7", "underscore-mxtransport", pillar=pillar, grains=OPENBSD_GRAINS)
    script = tmp_path / "mxtransport"
    script.write_text(rendered.text("/etc/rc.d/mxtransport"))
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    m = rendered.map
    assert f'daemon="{m["paths"]["venv"]}/bin/chatmail-mxtransport"' in script.read_text()
    # smtpd 7.6 retries an LMTP 5xx: the transport hands refusals to the SMTP channel
    assert f'daemon_flags="{m["paths"]["ini"]} --mta opensmtpd"' in script.read_text()
