#!/usr/bin/env python3
"""chatmail-pillar-from-ini: the Salt pillar for a relay that upstream's cmdeploy deployed.

    python3 scripts/lib/pillar_from_ini.py [INI] [--output PILLAR.sls]

Reads upstream's ``chatmail.ini`` (default /usr/local/lib/chatmaild/chatmail.ini) and
writes the pillar under which this formula serves the same settings: ``mail_domain``
and every key whose value differs from the formula's default
(salt/chatmail/parameters/defaults.yaml, the one source of defaults). Upstream keys with
no counterpart here are named (``note:`` lines, also kept as comments in the pillar).

Bad input (no ``[params]``, no ``mail_domain``, unknown keys, a comment after a value,
values chatmaild's model rejects) gives one ``error:`` line per problem, exit status 2
and no pillar. ``scripts/deploy --adopt`` runs this; it needs PyYAML and pydantic.
"""

from __future__ import annotations

import argparse
import configparser
import re
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
from chatmaild.fileio import write_text_atomic  # noqa: E402

DEFAULTS_PATH = REPO / "salt/chatmail/parameters/defaults.yaml"
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
    parser.add_argument("--defaults", type=Path, default=DEFAULTS_PATH, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        pillar, notes = pillar_from_params(read_params(args.ini), args.defaults)
    except Problems as exc:
        for line in exc.lines:
            print(f"error: {args.ini}: {line}", file=sys.stderr)
        print(f"{len(exc.lines)} problem(s): no pillar written", file=sys.stderr)
        return EXIT_PROBLEMS
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    text = render_pillar(pillar, notes, args.ini)
    if args.output:
        write_text_atomic(args.output, text, mode=0o600)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
