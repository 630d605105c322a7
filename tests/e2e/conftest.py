"""The applied-container fixtures: one relay per platform for the tests in this folder.

Every test runs once per platform (``relayclient.PLATFORMS``): Debian 12 with Postfix,
Debian 13 with Postfix (Dovecot 2.4) and Debian 13 with OpenSMTPD (``mta: opensmtpd``).
For each, a systemd-nspawn container boots
from the release's cached base rootfs, the repository is bind-mounted read-only at
/srv/chatmail, and `salt-call --local state.apply chatmail` applies the formula with a
pillar for a self-signed ``_``-domain relay. Containers share the host's network (tests
talk to 127.0.0.1), so pytest runs one platform's tests, stops that container, then boots
the next. Every test here is marked ``container``.

    .venv/bin/python -m pytest tests/e2e        # ~9 min with cached base rootfs tarballs
    CHATMAIL_E2E_PLATFORMS=debian13-opensmtpd ... pytest tests/e2e   # one platform only
    CHATMAIL_TEST_REUSE=1 ... pytest tests/e2e   # against the relay `scripts/deploy` runs

The harness itself is ``scripts/lib/relayctl.py`` (shared with ``scripts/deploy``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import relayctl
from relayclient import PLATFORMS, RelayClient

REPO_ROOT = Path(__file__).resolve().parents[2]

SESSIONS_DIR = Path("/var/tmp/chatmail-test")
DOMAIN = "_chatmail.test"


def _remove_stale_sessions() -> None:
    """Containers of sessions that were killed (SIGKILL, a lost CI job): stop and remove.

    Each session writes ``<root>.pid`` = "<nspawn pid> <pytest pid>"; a container whose
    pytest is gone is stopped (it holds the relay's ports) and its files removed.
    """
    if not SESSIONS_DIR.is_dir():
        return
    for pidfile in SESSIONS_DIR.glob("*.pid"):
        root = pidfile.with_suffix("")
        try:
            nspawn_pid, owner_pid = (int(p) for p in pidfile.read_text().split())
        except ValueError:
            nspawn_pid = owner_pid = 0
        if owner_pid and Path(f"/proc/{owner_pid}").exists():
            continue  # a session running right now
        stale = relayctl.Relay(root, name=root.name, pidfile=pidfile)
        if nspawn_pid and relayctl.is_nspawn(nspawn_pid):
            stale.attach(nspawn_pid)
        stale.destroy()
        relayctl.remove_tree(Path(f"{root}.src"))


#: The session's container, so the last test here can stop it (see below).
_RUNNING: list[relayctl.Relay] = []


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """Stop the container after the last test of this folder, not at the end of the whole
    session: the rest of the suite should not share the host with a running relay. Last,
    after pytest's own teardown ran the test's fixtures' finalizers, which may still use it."""
    here = Path(__file__).parent
    if nextitem is None or here not in Path(nextitem.path).parents:
        while _RUNNING:
            relay = _RUNNING.pop()
            relay.destroy()
            relayctl.remove_tree(relay.repo)


#: The background build of the patched Dovecot (test_dovecot_packages.py needs it).
_DOVECOT_BUILD: list[subprocess.Popen] = []


def pytest_collection_finish(session):
    """Start building the patched Dovecot for the selected releases in the background as
    soon as a test that needs it is collected: on a new machine the build takes longer than
    a relay's other tests, so it runs while they do (niced) and is cached afterwards."""
    if not any(Path(item.path).name == "test_dovecot_packages.py" for item in session.items):
        return
    import dovecotbuild

    # in test order; test_dovecot_packages.py covers each release on its Postfix relay
    suites = dict.fromkeys(p.suite for p in selected_platforms() if p.mta == "postfix")
    missing = [s for s in suites if not dovecotbuild.is_built(s)]
    if not missing or os.geteuid() != 0:
        return
    argv = ["nice", "-n", "10", sys.executable, dovecotbuild.__file__]
    for suite in missing:
        argv += ["--suite", suite]
    log = SESSIONS_DIR / "dovecot-build.log"
    SESSIONS_DIR.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        _DOVECOT_BUILD.append(
            subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        )


def pytest_sessionfinish(session):
    """A build still running when the tests end is stopped (nothing outlives the run)."""
    while _DOVECOT_BUILD:
        build = _DOVECOT_BUILD.pop()
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGTERM)
            build.wait(timeout=120)


def selected_platforms() -> tuple:
    if os.environ.get("CHATMAIL_TEST_REUSE"):
        return PLATFORMS[:1]  # the relay `scripts/deploy` runs
    wanted = os.environ.get("CHATMAIL_E2E_PLATFORMS")
    if not wanted:
        return PLATFORMS
    known = {p.id: p for p in PLATFORMS}
    unknown = set(wanted.split(",")) - set(known)
    if unknown:
        raise pytest.UsageError(
            f"CHATMAIL_E2E_PLATFORMS: unknown {sorted(unknown)}; know {sorted(known)}"
        )
    return tuple(known[name] for name in wanted.split(","))


def pytest_generate_tests(metafunc):
    # Session scope: pytest groups the tests by platform and tears one container down
    # before it boots the next.
    # A test or module may name the platforms it applies to (mark.on_platforms: ids).
    if "platform" in metafunc.fixturenames:
        only = metafunc.definition.get_closest_marker("on_platforms")
        platforms = [p for p in selected_platforms() if only is None or p.id in only.args]
        metafunc.parametrize(
            "platform", platforms, ids=[p.id for p in platforms], indirect=True, scope="session"
        )


@pytest.fixture(scope="session")
def platform(request):
    """The Debian release and MTA of this run (a ``relayclient.Platform``)."""
    return request.param


@pytest.fixture(scope="session")
def container(platform):
    """A booted relay container (formula not yet applied)."""
    if os.geteuid() != 0:
        pytest.fail("the container tests need root (systemd-nspawn)")
    if os.environ.get("CHATMAIL_TEST_REUSE"):
        # Development loop: test the relay `scripts/deploy` keeps running; leave it be.
        relay, _ = relayctl.persistent_relay()
        if not relay.is_running():
            pytest.fail("CHATMAIL_TEST_REUSE is set but `scripts/deploy` runs no relay")
        yield relay
        return
    try:
        relayctl.require_tools()
        _remove_stale_sessions()
        relayctl.require_free_ports()
    except relayctl.RelayError as exc:
        pytest.fail(str(exc), pytrace=False)
    SESSIONS_DIR.mkdir(parents=True, exist_ok=True)
    name = f"chatmail-test-{platform.suite}-{uuid.uuid4().hex[:8]}"
    # A snapshot of the checkout: edits made while the session runs cannot make the
    # second apply report changes.
    source = SESSIONS_DIR / f"{name}.src"
    pidfile = SESSIONS_DIR / f"{name}.pid"
    pidfile.write_text(f"0 {os.getpid()}")
    # The mailboxes on a filesystem of their own, so the campaign can fill it up.
    relay = relayctl.Relay(
        SESSIONS_DIR / name,
        name=name,
        repo=source,
        pidfile=pidfile,
        suite=platform.suite,
        mail_fs_mb=512,
    )
    with relayctl.sigterm_as_interrupt():
        try:
            relayctl.snapshot_repo(REPO_ROOT, source)
            relay.unpack()
            relay.boot()
            _RUNNING.append(relay)
            yield relay
        finally:
            if relay in _RUNNING:
                _RUNNING.remove(relay)
            relay.destroy()
            relayctl.remove_tree(source)


@pytest.fixture(scope="session")
def relay_pillar(platform):
    """The pillar the session's relay is applied with (settings override the defaults)."""

    def pillar(**settings):
        return relayctl.local_relay_pillar(DOMAIN, mta=platform.mta, **settings)

    return pillar


@pytest.fixture(scope="session")
def applied(container, relay_pillar):
    """The container after the first `state.apply chatmail`; its ApplyResult is `.first_apply`."""
    container.configure_salt(relay_pillar())
    result = container.apply()
    print(f"\nfirst apply: {result.seconds:.1f} s\n{result.summary()}")
    if not result.ok:
        journal = container.run("journalctl --no-pager -n 80 -p warning", check=False).stdout
        pytest.fail(f"{result.summary()}\n--- journal ---\n{journal}", pytrace=False)
    container.wait_for_services()
    container.first_apply = result
    return container


@pytest.fixture(scope="session")
def unreachable_mx():
    """An address for an MX that never answers, without a packet leaving the machine.

    The relay shares the host's network: mail to a real unrouted address (TEST-NET) would
    send SYNs out of the default route. A blackhole route to one lab address makes every
    connection fail at once, so the MTA defers the mail and it waits in the queue.
    """
    address = "198.19.255.254"
    subprocess.run(["ip", "route", "add", "blackhole", f"{address}/32"], check=True)
    try:
        yield address
    finally:
        subprocess.run(["ip", "route", "delete", "blackhole", f"{address}/32"], check=False)


@pytest.fixture(scope="session")
def relay(applied, platform) -> RelayClient:
    """Client-side helpers for the applied relay: accounts, IMAP, SMTP, HTTPS."""
    return RelayClient(applied, DOMAIN, platform)
