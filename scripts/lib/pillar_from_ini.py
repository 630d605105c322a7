#!/usr/bin/env python3
"""chatmail-pillar-from-ini: the Salt pillar for a relay that upstream's cmdeploy deployed.

    python3 scripts/lib/pillar_from_ini.py [INI] [--output PILLAR.sls]

Reads upstream's ``chatmail.ini`` (default /usr/local/lib/chatmaild/chatmail.ini) and
writes the pillar under which this formula serves the same settings: ``mail_domain``
and every key whose value differs from the formula's default
(salt/chatmail/parameters/defaults.yaml, the one source of defaults). Upstream keys with
no counterpart here are named (``note:`` lines, also kept as comments in the pillar).

The host's Dovecot is looked at too: a Debian 12 relay running upstream's own Dovecot
build (``dovecot.upstream.version`` in defaults.yaml) keeps it (``dovecot: packages:
upstream``), and ``--stage-debs /root`` puts the .debs upstream downloaded there where the
formula looks for them, when their sha256 is the pinned one, so the apply downloads nothing.

Bad input (no ``[params]``, no ``mail_domain``, unknown keys, a comment after a value,
values chatmaild's model rejects) gives one ``error:`` line per problem, exit status 2
and no pillar. ``scripts/deploy --adopt`` runs this; it needs PyYAML and pydantic.
"""

from __future__ import annotations

import argparse
import configparser
import hashlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from chatmaild.config import (  # noqa: E402
    DEFAULT_INI_PATH,
    Config,
    ConfigError,
    parse_params,
    parse_size_mb,
)
from chatmaild.fileio import write_bytes_atomic, write_text_atomic  # noqa: E402

DEFAULTS_PATH = REPO / "salt/chatmail/parameters/defaults.yaml"
OS_RELEASE = Path("/etc/os-release")
EXIT_PROBLEMS = 2

#: Upstream keys this formula has nothing for: why, and what the operator can do.
NO_COUNTERPART = {
    "mtail_address": "mtail is not deployed; the control API's /metrics (and Dovecot's "
    "OpenMetrics on 127.0.0.1:9900) replace it",
    "www_folder": "names a folder on the machine cmdeploy ran on; copy it to the relay and "
    "set chatmail:www:source to it",
    "passthrough_senders": "removed by upstream in 1.11 (no effect there either)",
    "passthrough_recipients": "removed by upstream in 1.11 (no effect there either)",
}

#: ini keys that are map keys outside ``settings`` (see map.jinja), handled one by one.
STRUCTURAL = {
    "mail_domain",
    "disable_ipv6",
    "tls_external_cert_and_key",
    "tls_mode",
    "mailboxes_dir",
    "nocreate_file",
    "counters_dir",
}

#: A comment after a value: upstream's ini parser keeps it as part of the value.
_TRAILING_COMMENT = re.compile(r"\s[#;]")


class Problems(Exception):
    """The ini cannot be adopted as it is; ``lines`` holds one message per problem."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def ini_value(value: object) -> str:
    """A defaults.yaml value as the formula writes it into chatmail.ini."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def yaml_value(config: Config, key: str) -> object:
    """The validated value of ``key`` in a type the pillar keeps (Path as text)."""
    value = getattr(config, key)
    return str(value) if isinstance(value, Path) else value


#: size settings are kept as text ("500M"); "500m" and "500M" are the same setting
SIZE_KEYS = ("max_mailbox_size", "min_available_memory", "min_free_disk_space")


def effective(config: Config, key: str) -> object:
    """What a setting means to the daemons (a size in MB, not its spelling)."""
    if key in SIZE_KEYS:
        return parse_size_mb(getattr(config, key))
    return getattr(config, key)


def read_params(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=None)
    try:
        with open(path, encoding="utf-8") as file:
            parser.read_file(file)
    except (OSError, UnicodeDecodeError, configparser.Error) as exc:
        raise Problems([f"{path}: cannot read it: {' '.join(str(exc).split())}"]) from None
    if not parser.has_section("params"):
        raise Problems([f"{path}: no [params] section"])
    return dict(parser.items("params"))


def formula_defaults(mail_domain: str, defaults_path: Path = DEFAULTS_PATH) -> Config:
    settings = yaml.safe_load(defaults_path.read_text())["settings"]
    params = {k: ini_value(v) for k, v in settings.items() if v is not None}
    return parse_params({"mail_domain": mail_domain, **params}).config


def pillar_from_params(
    params: dict[str, str], defaults_path: Path = DEFAULTS_PATH
) -> tuple[dict, list[str]]:
    """``(pillar, notes)`` for upstream's ``[params]``; raises Problems."""
    problems = []
    known = set(Config.model_fields)
    if not params.get("mail_domain", "").strip():
        problems.append("mail_domain: missing (upstream requires it too)")
    for key, value in params.items():
        if key not in known and key not in NO_COUNTERPART:
            problems.append(f"{key}: unknown key (a typo? upstream ignored it); remove it")
        elif _TRAILING_COMMENT.search(value):
            problems.append(
                f"{key}: a comment after the value ({value!r}); move it to a line of its own"
            )
    usable = {
        k: v
        for k, v in params.items()
        if k in known and not _TRAILING_COMMENT.search(v) and k != "mail_domain"
    }
    try:
        upstream = parse_params({"mail_domain": params.get("mail_domain") or "x", **usable}).config
    except ConfigError as exc:
        problems += [line.removeprefix("chatmail.ini: ") for line in str(exc).splitlines()]
    if problems:
        raise Problems(problems)

    domain = upstream.mail_domain
    default = formula_defaults(domain, defaults_path)
    chatmail: dict = {"mail_domain": domain}
    notes = [f"{key}: {why}" for key, why in NO_COUNTERPART.items() if params.get(key, "").strip()]
    settings = {}
    for key in sorted(set(usable) - STRUCTURAL - set(NO_COUNTERPART)):
        if effective(upstream, key) != effective(default, key):
            settings[key] = yaml_value(upstream, key)
    if "iroh_relay" not in params:
        notes.append(
            f"iroh_relay: upstream advertised its own iroh-relay (https://{domain}), which "
            "this formula does not run: none is advertised now (Delta Chat uses its own); "
            "set chatmail:settings:iroh_relay to keep one"
        )
    if settings:
        chatmail["settings"] = settings
    if upstream.disable_ipv6:
        chatmail["ipv6"] = False
    if upstream.tls_external_cert_and_key:
        cert, key = upstream.tls_external_cert_and_key.split()
        chatmail["tls"] = {"mode": "external", "cert": cert, "key": key}
    elif upstream.tls_mode:
        chatmail["tls"] = {"mode": upstream.tls_mode}
    paths = {}
    if upstream.mailboxes_path != default.mailboxes_path:
        paths["mailboxes"] = str(upstream.mailboxes_path)
    if upstream.nocreate_file != default.nocreate_file:
        paths["nocreate"] = str(upstream.nocreate_file)
    if upstream.counters_dir != default.counters_dir:
        paths["counters"] = str(upstream.counters_dir)
    if paths:
        chatmail["paths"] = paths
    return {"chatmail": chatmail}, notes


def installed_version(package: str) -> str:
    """The installed version of a Debian package; "" when it is not installed."""
    try:
        res = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True
        )
    except FileNotFoundError:  # no dpkg: not a Debian host
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def read_os_release(path: Path = OS_RELEASE) -> dict[str, str]:
    """os-release(5) fields ({} without the file)."""
    fields = {}
    try:
        text = path.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            fields[key.strip()] = "".join(shlex.split(value))
    return fields


def dovecot_pillar(
    installed: str, os_release: dict[str, str], dovecot: dict
) -> tuple[dict, list[str]]:
    """``(chatmail:dovecot pillar, notes)`` for the Dovecot the relay runs: upstream's own
    build stays where the formula can install it (Debian 12; map.jinja refuses it on a
    release with Dovecot 2.4's syntax), else the distribution's replaces it."""
    version = dovecot["upstream"]["version"]
    if installed != version:
        return {}, []
    if (os_release.get("ID"), os_release.get("VERSION_ID")) == ("debian", "12"):
        return {"packages": "upstream"}, [
            f"dovecot: upstream's Dovecot {version} stays (dovecot:packages upstream); set "
            "chatmail:dovecot:packages to debian or patched to change"
        ]
    release = os_release.get("PRETTY_NAME") or "this system"
    return {}, [
        f"dovecot: upstream's Dovecot {version} is replaced by {release}'s own (this formula "
        "installs upstream's packages on Debian 12 only); maildirs and indexes stay readable"
    ]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def staged_deb(upstream: dict, package: str, arch: str) -> Path:
    """Where salt/chatmail/dovecot/packages.sls keeps one of upstream's .debs."""
    return Path(upstream["dir"]) / f"{package}_{arch}.deb"


def stage_upstream_debs(source_dir: Path, dovecot: dict) -> list[str]:
    """Upstream's Dovecot .debs found in ``source_dir`` (named as in their download URL, as
    upstream's deployer saves them) with the pinned sha256, copied to where
    salt/chatmail/dovecot/packages.sls keeps them (``staged_deb``): that state then finds
    the file with its hash and downloads nothing. One line per file placed."""
    upstream = dovecot["upstream"]
    placed = []
    for package, by_arch in upstream["sha256"].items():
        for arch, sha256 in by_arch.items():
            url = upstream["url"].replace("{package}", package).replace("{arch}", arch)
            source = source_dir / url.rsplit("/", 1)[1]
            dest = staged_deb(upstream, package, arch)
            if not source.is_file() or sha256_file(source) != sha256:
                continue
            if dest.is_file() and sha256_file(dest) == sha256:
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_bytes_atomic(dest, source.read_bytes(), mode=0o644)
            placed.append(f"placed {source} as {dest} (sha256 {sha256[:12]}..., as pinned)")
    return placed


def render_pillar(pillar: dict, notes: list[str], source: Path) -> str:
    header = [
        f"# Pillar of this chatmail relay, taken over from upstream's {source}",
        "# (scripts/lib/pillar_from_ini.py; every key: pillar.example).",
    ]
    header += [f"# note: {note}" for note in notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(pillar, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ini", nargs="?", type=Path, default=DEFAULT_INI_PATH)
    parser.add_argument("--output", type=Path, help="write the pillar here (default: stdout)")
    parser.add_argument(
        "--stage-debs",
        type=Path,
        metavar="DIR",
        help="where upstream downloaded its Dovecot .debs (/root): when the pillar keeps "
        "upstream's Dovecot, copy them to where the formula looks for them",
    )
    parser.add_argument("--defaults", type=Path, default=DEFAULTS_PATH, help=argparse.SUPPRESS)
    # the host's facts, given by the tests (default: dpkg-query and /etc/os-release)
    parser.add_argument("--dovecot-version", help=argparse.SUPPRESS)
    parser.add_argument("--os-release", type=Path, default=OS_RELEASE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        pillar, notes = pillar_from_params(read_params(args.ini), args.defaults)
    except Problems as exc:
        for line in exc.lines:
            print(f"error: {args.ini}: {line}", file=sys.stderr)
        print(f"{len(exc.lines)} problem(s): no pillar written", file=sys.stderr)
        return EXIT_PROBLEMS
    dovecot_defaults = yaml.safe_load(args.defaults.read_text())["dovecot"]
    installed = (
        installed_version("dovecot-core") if args.dovecot_version is None else args.dovecot_version
    )
    dovecot, dovecot_notes = dovecot_pillar(
        installed, read_os_release(args.os_release), dovecot_defaults
    )
    if dovecot:
        pillar["chatmail"]["dovecot"] = dovecot
    notes += dovecot_notes
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    text = render_pillar(pillar, notes, args.ini)
    if args.output:
        write_text_atomic(args.output, text, mode=0o600)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.stage_debs and dovecot.get("packages") == "upstream":
        for line in stage_upstream_debs(args.stage_debs, dovecot_defaults):
            print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
