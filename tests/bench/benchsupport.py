"""A throw-away relay container for the benchmarks: booted, applied, removed at the end."""

from __future__ import annotations

import contextlib
import sys
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT / "scripts" / "lib"))
sys.path.insert(0, str(REPO_ROOT / "tests" / "e2e"))
sys.path.insert(0, str(REPO_ROOT / "tests" / "chatmaild"))

import relayctl  # noqa: E402
from relayclient import PLATFORMS, RelayClient  # noqa: E402

DOMAIN = "_chatmail.test"
SESSIONS_DIR = Path("/var/tmp/chatmail-test")


def platform_argument(parser) -> None:
    parser.add_argument("--platform", choices=[p.id for p in PLATFORMS], default=PLATFORMS[0].id)


@contextlib.contextmanager
def applied_relay(platform_id: str):
    """(RelayClient, first ApplyResult) for a fresh container of that platform.

    The pid file lets the next test session stop this container if we get killed.
    """
    platform = {p.id: p for p in PLATFORMS}[platform_id]
    relayctl.require_tools()
    relayctl.require_free_ports()
    SESSIONS_DIR.mkdir(parents=True, exist_ok=True)
    name = f"chatmail-bench-{uuid.uuid4().hex[:8]}"
    source = SESSIONS_DIR / f"{name}.src"
    container = relayctl.Relay(
        SESSIONS_DIR / name,
        name=name,
        repo=source,
        pidfile=SESSIONS_DIR / f"{name}.pid",
        suite=platform.suite,
        mail_fs_mb=512,  # the mailboxes on their own filesystem: the campaign fills it
    )
    with relayctl.sigterm_as_interrupt(), _removed(container, source):
        relayctl.snapshot_repo(REPO_ROOT, source)
        container.unpack()
        container.boot()
        container.configure_salt(relayctl.local_relay_pillar(DOMAIN, mta=platform.mta))
        first = container.apply()
        if not first.ok:
            raise relayctl.RelayError(first.summary())
        container.wait_for_services()
        yield RelayClient(container, DOMAIN, platform), first


@contextlib.contextmanager
def _removed(container, source: Path):
    """Stop and remove the container and its source snapshot, also on SIGTERM."""
    try:
        yield
    finally:
        container.destroy()
        relayctl.remove_tree(source)
