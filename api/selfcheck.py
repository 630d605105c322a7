"""``chatmail-selfcheck --settings api.json``: the end-to-end probe once, as the last state
of ``state.apply chatmail`` (a highstate that proves mail flows).

It waits until every service the status checks watch is active (an apply has just
restarted some), then sends the probe message (submission -> filter -> delivery ->
IMAP), retrying a failure until ``--within`` seconds have passed: a daemon started by
this very apply may still be opening its socket. It prints Salt's stateful JSON line;
the exit status is 1 when mail does not flow, with the failed step in the comment.
``--dry-run`` (Salt's test=True) only says what it would do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from chatmaild.config import ConfigError, read_config

from .checks import parse_systemctl_is_active, run_command
from .probe import probe_once, unprovable
from .settings import Settings, SettingsError, load_settings

RETRY_S = 5.0


def inactive_services(settings: Settings) -> list[str]:
    names = [s.name for s in settings.services]
    if settings.service_manager != "systemd" or not names:
        return []
    _, stdout, _ = asyncio.run(run_command(["systemctl", "is-active", "--", *names], 10))
    try:
        states = parse_systemctl_is_active(names, stdout)
    except ValueError:
        return names
    return [name for name, state in states.items() if state != "active"]


def selfcheck(settings: Settings, within: float) -> tuple[bool, str]:
    config = read_config(settings.chatmail_ini)
    deadline = time.monotonic() + within
    while inactive := inactive_services(settings):
        if time.monotonic() >= deadline:
            return False, f"step services: not active after {within:.0f} s: {', '.join(inactive)}"
        time.sleep(1)
    refused_before = False
    while True:
        result = probe_once(settings, config)
        if result.ok:
            return True, f"mail flows: {result.detail} in {result.duration_s:.1f} s"
        out_of_time = time.monotonic() + RETRY_S >= deadline
        refused = unprovable(result, config)
        # Refused twice with every service up (or no time left): waiting cannot change it.
        if refused and (refused_before or out_of_time):
            return True, (
                f"not proven: account creation is closed ({config.nocreate_file}) and "
                f"the probe account cannot log in ({result.detail})"
            )
        if out_of_time:
            return False, f"step {result.detail}"
        refused_before = refused
        time.sleep(RETRY_S)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatmail-selfcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True, help="api.json, rendered by the formula")
    parser.add_argument("--within", type=float, default=180.0, help="seconds to get mail through")
    parser.add_argument("--dry-run", action="store_true", help="only say what would be done")
    args = parser.parse_args(argv)
    if args.dry_run:
        ok, comment = True, "would send the end-to-end probe through the relay"
    else:
        try:
            ok, comment = selfcheck(load_settings(args.settings), args.within)
        except (SettingsError, ConfigError) as exc:
            ok, comment = False, f"step settings: {exc}"
    print(json.dumps({"changed": False, "comment": f"chatmail probe: {comment}"}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
