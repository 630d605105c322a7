"""Benchmark: Dovecot alone, from an LMTP delivery to the EXISTS an IMAP client in IDLE sees,
with Debian's Dovecot and then our patched build, in one throw-away container per release.

No MTA, no filters, no Delta Chat: a minimal Dovecot (static passdb, Maildir), one IMAP
client in IDLE and one LMTP client, both in Python inside the container (no init:
systemd-nspawn --pipe). Stock is the baseline: the ratio is patched / stock. Binds
127.0.0.1:11143 and :11024 only, so it runs beside a relay container.

Usage: .venv/bin/python tests/bench/bench_dovecot_idle.py [--rounds 15] [--suite trixie]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import uuid

from benchsupport import SESSIONS_DIR
import dovecotbuild
import relayctl

IMAP_PORT, LMTP_PORT = 11143, 11024

CLIENT = r"""
import imaplib, smtplib, statistics, sys, time
imap = imaplib.IMAP4("127.0.0.1", IMAP_PORT)
imap.login("u1", "pass")
imap.select("INBOX")
lmtp = smtplib.LMTP("127.0.0.1", LMTP_PORT)
times = []
for i in range(int(sys.argv[1])):
    imap.send(b"a1 IDLE\r\n")
    assert imap.readline().startswith(b"+")
    started = time.perf_counter()
    lmtp.sendmail("a@x", ["u1"], f"Subject: {i}\r\nMessage-ID: <{i}@x>\r\n\r\nhi\r\n")
    while b"EXISTS" not in imap.readline():
        pass
    times.append(time.perf_counter() - started)
    imap.send(b"DONE\r\n")
    while not imap.readline().startswith(b"a1 "):
        pass
    time.sleep(0.2)
print(statistics.median(times), min(times), max(times))
""".replace("IMAP_PORT", str(IMAP_PORT)).replace("LMTP_PORT", str(LMTP_PORT))

CONF_23 = f"""protocols = imap lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
passdb {{
  driver = static
  args = password=pass
}}
userdb {{
  driver = static
  args = uid=vmail gid=vmail home=/home/vmail/%u
}}
mail_location = maildir:~/Maildir
service imap-login {{
  inet_listener imap {{
    port = {IMAP_PORT}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {LMTP_PORT}
  }}
}}
"""

CONF_24 = f"""dovecot_config_version = 2.4.1
dovecot_storage_version = 2.4.1
protocols = imap lmtp
listen = 127.0.0.1
ssl = no
auth_allow_cleartext = yes
passdb static {{
  password = pass
}}
userdb static {{
  fields {{
    uid = vmail
    gid = vmail
    home = /home/vmail/%{{user}}
  }}
}}
mail_driver = maildir
mail_path = ~/Maildir
service imap-login {{
  inet_listener imap {{
    port = {IMAP_PORT}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service lmtp {{
  inet_listener lmtp {{
    listen = 127.0.0.1
    port = {LMTP_PORT}
  }}
}}
"""

PACKAGES = "dovecot-core dovecot-imapd dovecot-lmtpd"
INSTALL = (
    "apt-get -qy install --allow-downgrades --no-install-recommends "
    f"-o Dpkg::Options::=--force-confold {PACKAGES} >/dev/null 2>&1"
)
#: Runs in the container (no init: nspawn --pipe): stock, then the patched repository.
SCRIPT = f"""set -e
export DEBIAN_FRONTEND=noninteractive
# the packages' scripts must not start Dovecot on the host's ports 143/993
printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
apt-get -q update >/dev/null 2>&1
{INSTALL}
useradd -r -m -d /home/vmail vmail
cp /root/dovecot.conf /etc/dovecot/dovecot.conf
measure() {{
  dovecot; sleep 2
  echo "$1 $(dpkg-query -W -f='${{Version}}' dovecot-core) $(python3 /root/idle_client.py $2)"
  doveadm stop; sleep 2
}}
measure stock $1
echo 'deb [trusted=yes] file:/root/repo ./' > /etc/apt/sources.list.d/chatmail-dovecot.list
printf 'Package: dovecot-*\\nPin: version /[+]chatmail[0-9]+$/\\nPin-Priority: 1001\\n' \\
    > /etc/apt/preferences.d/chatmail-dovecot
apt-get -q update >/dev/null 2>&1
{INSTALL}
measure patched $1
"""


def run_suite(suite: str, rounds: int) -> dict[str, tuple[str, list[float]]]:
    repo = dovecotbuild.ensure_built(suite)
    root = SESSIONS_DIR / f"chatmail-bench-idle-{uuid.uuid4().hex[:8]}"
    try:
        root.mkdir(parents=True)
        tarball = relayctl.ensure_rootfs(suite)
        relayctl.run_host(
            ["tar", "-C", str(root), "--numeric-owner", "-I", "zstd -T0", "-xpf", str(tarball)]
        )
        shutil.copytree(repo, root / "root/repo")
        (root / "root/idle_client.py").write_text(CLIENT)
        (root / "root/dovecot.conf").write_text(CONF_23 if suite == "bookworm" else CONF_24)
        out = relayctl.run_host(
            relayctl.nspawn_base(root) + ["--pipe", "/bin/sh", "-c", SCRIPT, "sh", str(rounds)],
            capture_output=True,
            text=True,
        ).stdout
    finally:
        relayctl.remove_tree(root)
    results = {}
    for line in out.splitlines():
        label, version, *stats = line.split()
        results[label] = (version, [float(x) for x in stats])
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--suite", choices=sorted(dovecotbuild.pinned_sources()), action="append")
    args = parser.parse_args()
    with relayctl.sigterm_as_interrupt():
        for suite in args.suite or sorted(dovecotbuild.pinned_sources()):
            results = run_suite(suite, args.rounds)
            for label, (version, (med, low, high)) in results.items():
                print(
                    f"{suite} {label:7} {version}: LMTP delivery -> IDLE EXISTS median "
                    f"{med * 1000:5.0f} ms (min {low * 1000:.0f}, max {high * 1000:.0f}, "
                    f"{args.rounds} rounds)"
                )
            ratio = results["patched"][1][0] / results["stock"][1][0]
            print(f"{suite} patched / stock: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
