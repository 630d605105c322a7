"""The push notifier against a real local HTTP server standing in for the push service."""

from __future__ import annotations

import http.server
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Self

import pytest

from chatmaild.counters import Counters
from chatmaild.metadata import Metadata
from chatmaild.notifier import (
    DEADLINE_S,
    QUEUE_DIRNAME,
    Notifier,
    QueueEntry,
    parse_entry,
    retry_delay,
    serialize_entry,
)

ADDR = "user1@chat.example.org"
GUID = "43f5f508a7ea0366dff30200c15250e3"


class PushService:
    """The notification service: answers by token prefix.

    ``ok…`` 200, ``gone…`` 410, ``fail…`` 500, ``flaky…`` 500 twice then 200,
    ``hang…`` waits until released (or 30 s) before answering 200.
    """

    def __init__(self):
        self.requests: list[tuple[float, str]] = []
        self.release = threading.Event()
        self._lock = threading.Lock()
        service = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                token = self.rfile.read(length).decode()
                with service._lock:
                    service.requests.append((time.monotonic(), token))
                    seen = sum(1 for _, t in service.requests if t == token)
                if token.startswith("hang"):
                    service.release.wait(30)
                    status = 200
                elif token.startswith("ok"):
                    status = 200
                elif token.startswith("gone"):
                    status = 410
                elif token.startswith("flaky"):
                    status = 200 if seen > 2 else 500
                else:
                    status = 500
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass  # the notifier timed out and hung up

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/notify"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def tokens(self) -> list[str]:
        with self._lock:
            return [t for _, t in self.requests]

    def times(self, token: str) -> list[float]:
        with self._lock:
            return [ts for ts, t in self.requests if t == token]

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def push_service():
    service = PushService()
    yield service
    service.close()


@pytest.fixture
def queue_dir(make_config):
    config = make_config("chat.example.org")
    path = config.mailboxes_path / QUEUE_DIRNAME
    path.mkdir()
    return path


@pytest.fixture
def metadata(queue_dir):
    return Metadata(queue_dir.parent)


@pytest.fixture
def make_notifier(queue_dir, metadata, push_service):
    made = []

    def make(start: bool = True, **kwargs) -> Notifier:
        kwargs.setdefault("retry_base_delay", 0.05)
        kwargs.setdefault("request_timeout", 5)
        kwargs.setdefault("workers", 2)
        url = kwargs.pop("url", push_service.url)
        notifier = Notifier(queue_dir, metadata, url, Counters(None, "metadata"), **kwargs)
        made.append(notifier)
        if start:
            notifier.start()
        return notifier

    yield make
    for notifier in made:
        notifier.stop()


def wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def sent_total(counters_file: Path) -> float:
    rows = json.loads(counters_file.read_text()).get("notifications_sent_total", [])
    return sum(row["value"] for row in rows)


def queue_names(queue_dir: Path) -> list[str]:
    return sorted(p.name for p in queue_dir.iterdir())


# -- pure parts ----------------------------------------------------------------------


def test_retry_schedule_matches_upstream():
    assert [retry_delay(n) for n in range(1, 6)] == [8, 64, 512, 4096, 32768]
    # attempts at 0, 8, 72, 584, 4680 s; the next would start after the 5 h deadline
    elapsed, attempts = 0.0, 1
    while elapsed + retry_delay(attempts) <= DEADLINE_S:
        elapsed += retry_delay(attempts)
        attempts += 1
    assert (attempts, elapsed) == (5, 4680)


def test_queue_entry_roundtrip():
    entry = QueueEntry(addr=ADDR, start_ts=1700000000.5, token="abc/+=")
    assert serialize_entry(entry) == f"{ADDR}\n1700000000.5\nabc/+=".encode()
    assert parse_entry(serialize_entry(entry)) == entry


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"user@x\n123",
        b"user@x\nnot-a-time\ntok",
        b"nouser\n123\ntok",
        b"user@x\n123\n",
        b"../../etc@x\n123\ntok",
        b"user@x\n123\ntok\nextra",
        b"\xff\xfe\n1\nt",
        b"user@x\n123\ntwo words",
    ],
    ids=[
        "empty",
        "half-written",
        "bad-ts",
        "no-at",
        "no-token",
        "path-traversal",
        "extra-line",
        "binary",
        "space-in-token",
    ],
)
def test_parse_entry_rejects(data):
    with pytest.raises(ValueError):
        parse_entry(data)


# -- sending -------------------------------------------------------------------------


def test_200_sends_the_raw_token_and_deletes_the_item(
    make_notifier, metadata, push_service, queue_dir
):
    metadata.add_token_to_addr(ADDR, "ok-device-1")
    notifier = make_notifier()
    notifier.new_message_for_addr(ADDR)
    wait_for(lambda: push_service.tokens() == ["ok-device-1"])
    wait_for(lambda: queue_names(queue_dir) == [])
    assert notifier.counters.value("notifications_sent_total") == 1
    assert notifier.counters.value("notifications_failed_total") == 0
    assert metadata.get_tokens_for_addr(ADDR) == ["ok-device-1"]


def test_every_device_of_an_address_is_notified(make_notifier, metadata, push_service, queue_dir):
    for token in ("ok-a", "ok-b", "ok-c"):
        metadata.add_token_to_addr(ADDR, token)
    metadata.add_token_to_addr("other@chat.example.org", "ok-other")
    notifier = make_notifier()
    notifier.new_message_for_addr(ADDR)
    wait_for(lambda: sorted(push_service.tokens()) == ["ok-a", "ok-b", "ok-c"])
    wait_for(lambda: queue_names(queue_dir) == [])
    assert notifier.counters.value("notifications_sent_total") == 3


def test_410_removes_the_token(make_notifier, metadata, push_service, queue_dir):
    metadata.add_token_to_addr(ADDR, "gone-device")
    metadata.add_token_to_addr(ADDR, "ok-device")
    notifier = make_notifier()
    notifier.new_message_for_addr(ADDR)
    wait_for(lambda: metadata.get_tokens_for_addr(ADDR) == ["ok-device"])
    wait_for(lambda: queue_names(queue_dir) == [])
    time.sleep(0.3)  # longer than the first retry delay: a 410 must not be retried
    assert push_service.tokens().count("gone-device") == 1
    assert notifier.counters.value("notifications_failed_total") == 0


def test_500_is_retried_with_backoff_until_the_deadline(
    make_notifier, metadata, push_service, queue_dir, caplog
):
    metadata.add_token_to_addr(ADDR, "fail-device")
    # delays 0.05, 0.4, 3.2 s: attempts at 0, 0.05, 0.45; the next would pass the deadline
    notifier = make_notifier(deadline=2.0)
    with caplog.at_level(logging.INFO):
        notifier.new_message_for_addr(ADDR)
        wait_for(lambda: queue_names(queue_dir) == [])
    times = push_service.times("fail-device")
    assert len(times) == 3
    assert times[1] - times[0] >= 0.045
    assert times[2] - times[1] >= 0.39
    assert notifier.counters.value("notifications_failed_total") == 3
    assert notifier.counters.value("notifications_sent_total") == 0
    assert caplog.text.count("Notification request failed") == 3
    assert "notification exceeded deadline" in caplog.text
    assert "fail-device" not in caplog.text and ADDR not in caplog.text
    assert metadata.get_tokens_for_addr(ADDR) == ["fail-device"]


def test_transient_failures_then_success(make_notifier, metadata, push_service, queue_dir):
    metadata.add_token_to_addr(ADDR, "flaky-device")
    notifier = make_notifier()
    notifier.new_message_for_addr(ADDR)
    wait_for(lambda: notifier.counters.value("notifications_sent_total") == 1)
    wait_for(lambda: queue_names(queue_dir) == [])
    assert push_service.tokens() == ["flaky-device"] * 3
    assert notifier.counters.value("notifications_failed_total") == 2


def test_unreachable_service_is_retried_then_dropped(make_notifier, metadata, queue_dir, caplog):
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    metadata.add_token_to_addr(ADDR, "ok-device")
    notifier = make_notifier(url=f"http://127.0.0.1:{port}/notify", deadline=1.5)
    with caplog.at_level(logging.WARNING):
        notifier.new_message_for_addr(ADDR)
        wait_for(lambda: queue_names(queue_dir) == [])
    assert notifier.counters.value("notifications_failed_total") == 3
    assert "ConnectionRefusedError" in caplog.text or "URLError" in caplog.text


def test_hanging_service_times_out_and_others_keep_flowing(
    make_notifier, metadata, push_service, queue_dir, caplog
):
    metadata.add_token_to_addr(ADDR, "hang-device")
    metadata.add_token_to_addr("other@chat.example.org", "ok-other")
    # the hanging request times out after 3 s, when a retry would already be too late
    notifier = make_notifier(request_timeout=3.0, deadline=1.0)
    with caplog.at_level(logging.WARNING):
        notifier.new_message_for_addr(ADDR)
        wait_for(lambda: push_service.tokens() == ["hang-device"])
        # one worker is stuck on the hanging request; the other still delivers
        notifier.new_message_for_addr("other@chat.example.org")
        wait_for(lambda: "ok-other" in push_service.tokens(), timeout=2.5)
        wait_for(lambda: queue_names(queue_dir) == [], timeout=10)
    assert notifier.counters.value("notifications_sent_total") == 1
    assert notifier.counters.value("notifications_failed_total") >= 1
    assert "timed out" in caplog.text
    assert "notification exceeded deadline" in caplog.text


# -- persistence ---------------------------------------------------------------------


def test_items_are_persisted_until_sent_and_requeued_after_restart(
    make_notifier, metadata, push_service, queue_dir
):
    metadata.add_token_to_addr(ADDR, "ok-1")
    metadata.add_token_to_addr(ADDR, "ok-2")
    first = make_notifier(start=False)
    first.new_message_for_addr(ADDR)
    names = queue_names(queue_dir)
    assert len(names) == 2
    entries = [parse_entry((queue_dir / n).read_bytes()) for n in names]
    assert sorted(e.token for e in entries) == ["ok-1", "ok-2"]
    assert push_service.tokens() == []
    # "restart": a new notifier finds the items on disk
    second = make_notifier(start=False)
    assert second.requeue_persistent_items() == 2
    second.start()
    wait_for(lambda: sorted(push_service.tokens()) == ["ok-1", "ok-2"])
    wait_for(lambda: queue_names(queue_dir) == [])
    second.stop()


def test_requeue_removes_spurious_and_half_written_items(
    make_notifier, push_service, queue_dir, caplog
):
    now = time.time()
    good = serialize_entry(QueueEntry(ADDR, now, "ok-survivor"))
    (queue_dir / ("a" * 32)).write_bytes(good)
    (queue_dir / ".b1b2.3c.tmp").write_bytes(good)  # crashed before the rename
    (queue_dir / "halfwritten").write_bytes(good[:20])
    (queue_dir / "binary").write_bytes(b"\xff\x00\xfe")
    (queue_dir / "empty").write_bytes(b"")
    (queue_dir / "subdir").mkdir()
    notifier = make_notifier(start=False)
    with caplog.at_level(logging.WARNING):
        assert notifier.requeue_persistent_items() == 1
    assert caplog.text.count("removing spurious queue item") == 5
    assert queue_names(queue_dir) == ["a" * 32, "subdir"]  # rmdir is not our business
    notifier.start()
    wait_for(lambda: push_service.tokens() == ["ok-survivor"])
    wait_for(lambda: queue_names(queue_dir) == ["subdir"])
    notifier.stop()


def test_worker_survives_a_failing_token_store(make_notifier, push_service, queue_dir, caplog):
    # metadata.json replaced by a directory: removing the token after a 410 fails
    (queue_dir.parent / ADDR / "metadata.json").mkdir(parents=True)
    (queue_dir / ("e" * 32)).write_bytes(serialize_entry(QueueEntry(ADDR, time.time(), "gone-x")))
    notifier = make_notifier(start=False, workers=1)
    notifier.requeue_persistent_items()
    with caplog.at_level(logging.ERROR):
        notifier.start()
        wait_for(lambda: queue_names(queue_dir) == [])
    assert "unexpected error" in caplog.text
    Metadata(queue_dir.parent).add_token_to_addr("b@chat.example.org", "ok-after")
    notifier.new_message_for_addr("b@chat.example.org")
    wait_for(lambda: "ok-after" in push_service.tokens())


def test_requeued_item_past_deadline_is_dropped_unsent(
    make_notifier, push_service, queue_dir, caplog
):
    old = serialize_entry(QueueEntry(ADDR, time.time() - DEADLINE_S - 1, "ok-stale"))
    (queue_dir / ("c" * 32)).write_bytes(old)
    notifier = make_notifier(start=False, deadline=DEADLINE_S)
    notifier.requeue_persistent_items()
    with caplog.at_level(logging.ERROR):
        notifier.start()
        wait_for(lambda: queue_names(queue_dir) == [])
    assert push_service.tokens() == []
    assert "notification exceeded deadline" in caplog.text


def test_stop_keeps_pending_retries_on_disk(make_notifier, metadata, push_service, queue_dir):
    metadata.add_token_to_addr(ADDR, "fail-device")
    notifier = make_notifier(retry_base_delay=60)
    notifier.new_message_for_addr(ADDR)
    wait_for(lambda: push_service.tokens() == ["fail-device"])
    notifier.stop()
    assert len(queue_names(queue_dir)) == 1
    alive = [t.name for t in threading.enumerate() if t.name.startswith("notifier")]
    assert alive == []


# -- the daemon end to end -------------------------------------------------------------


class MetadataDaemon:
    """``chatmail-metadata SOCKET INI`` as a real process; stopped with SIGTERM on exit."""

    def __init__(self, socket_path: Path, ini_path: Path):
        self.socket_path = socket_path
        self.proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "chatmail-metadata"),
                str(socket_path),
                str(ini_path),
            ],
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.stderr = ""

    def __enter__(self) -> Self:
        # generous: the daemon's start-up competes with other test runs for the CPU
        wait_for(lambda: self.socket_path.exists() or self.proc.poll() is not None, timeout=60)
        assert self.proc.poll() is None, self.proc.communicate()[1].decode()
        return self

    def connect(self) -> socket.socket:
        conn = socket.socket(socket.AF_UNIX)
        conn.settimeout(10)
        wait_for(lambda: conn.connect_ex(str(self.socket_path)) == 0, timeout=10)
        return conn

    def __exit__(self, *exc_info) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.stderr = self.proc.communicate(timeout=10)[1].decode()


def test_chatmail_metadata_daemon_end_to_end(make_config, ini_path, push_service, sock_dir):
    config = make_config("chat.example.org", push_notification_url=push_service.url)
    queue_dir = config.mailboxes_path / QUEUE_DIRNAME
    queue_dir.mkdir()
    (queue_dir / "leftover.tmp").write_text("x")
    (queue_dir / ("d" * 32)).write_bytes(
        serialize_entry(QueueEntry(ADDR, time.time(), "ok-from-last-run"))
    )
    with MetadataDaemon(sock_dir / "metadata.socket", ini_path) as daemon:
        with daemon.connect() as conn:
            reader = conn.makefile("rb")
            conn.sendall(
                b"H3\t2\t0\t\tmetadata\n"
                + b"garbage\xff\n"
                + f"B1\t{ADDR}\nS1\tpriv/{GUID}/devicetoken\tok-live\nC1\n".encode()
                + f"Lpriv/{GUID}/devicetoken\t{ADDR}\n".encode()
                + f"B2\t{ADDR}\nS2\tpriv/{GUID}/messagenew\t\nC2\n".encode()
            )
            assert reader.readline() == b"O1\n"
            assert reader.readline() == b"Ook-live\n"
            assert reader.readline() == b"O2\n"
        wait_for(lambda: sorted(push_service.tokens()) == ["ok-from-last-run", "ok-live"], 30)
        wait_for(lambda: queue_names(queue_dir) == [], 30)
        counters = config.counters_dir / "metadata.json"
        wait_for(counters.exists, 30)
        wait_for(lambda: sent_total(counters) == 2, 30)
    assert daemon.proc.returncode == 0
    assert "removing spurious queue item leftover.tmp" in daemon.stderr
    assert "re-queued 1 pending notification" in daemon.stderr


# -- with a real Dovecot ------------------------------------------------------------------
# Dovecot's imap and dovecot-lda binaries run one-shot on stdin/stdout (PREAUTH / local
# delivery): no Dovecot daemon, no listening port. This checks what unit tests can only
# assume: the dict keys Dovecot sends for METADATA, and that the LMTP Lua script shipped
# in the Salt formula really triggers a push.

DOVECOT_LIBEXEC = Path("/usr/lib/dovecot")
PUSH_LUA = Path(__file__).resolve().parents[2] / "salt/chatmail/dovecot/files/push_notification.lua"
MAIL_USER = "nobody"


def dovecot_version() -> str:
    try:
        return subprocess.run(
            ["dovecot", "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout.strip()
    except OSError:
        return ""


def write_dovecot_conf(base: Path, socket_path: Path, as_root: bool) -> Path:
    conf = base / "dovecot.conf"
    lines = [
        f"base_dir = {base}/run",
        f"state_dir = {base}/state",
        f"log_path = {base}/dovecot.log",
        f"mail_location = maildir:{base}/mailboxes/%u",
        "ssl = no",
        f"mail_attribute_dict = proxy:{socket_path}:metadata",
        "protocol imap {",
        "  imap_metadata = yes",
        "}",
        "protocol lda {",
        "  mail_plugins = $mail_plugins mail_lua notify push_notification push_notification_lua",
        "}",
        "plugin {",
        f"  push_notification_driver = lua:file={base}/push_notification.lua",
        "}",
    ]
    if as_root:  # Dovecot refuses mail access as root: drop to an unprivileged user
        lines += [f"mail_uid = {MAIL_USER}", "mail_gid = nogroup"]
    conf.write_text("\n".join(lines) + "\n")
    return conf


def test_dovecot_metadata_and_lua_push_end_to_end(make_config, ini_path, push_service, sock_dir):
    version = dovecot_version()
    if not version.startswith("2.3.") or not (DOVECOT_LIBEXEC / "dovecot-lda").exists():
        pytest.skip(f"needs Dovecot 2.3 binaries (found {version or 'none'})")
    as_root = os.geteuid() == 0
    base = sock_dir
    base.chmod(0o755)  # the unprivileged mail user must reach config and mailboxes
    for name in ("run", "state", "mailboxes", "home"):
        (base / name).mkdir()
    (base / "dovecot.log").touch()
    shutil.copy(PUSH_LUA, base / "push_notification.lua")
    if as_root:
        for path in [base / n for n in ("run", "state", "mailboxes", "home", "dovecot.log")]:
            shutil.chown(path, MAIL_USER, "nogroup")
    socket_path = base / "metadata.socket"
    conf = write_dovecot_conf(base, socket_path, as_root)
    config = make_config(
        "chat.example.org",
        mailboxes_dir=base / "mailboxes",
        push_notification_url=push_service.url,
    )
    env = {**os.environ, "USER": ADDR, "HOME": str(base / "home")}
    drop = ["setpriv", f"--reuid={MAIL_USER}", "--regid=nogroup", "--clear-groups"]

    def imap(*commands: str) -> str:
        script = "".join(f"a{i} {c}\r\n" for i, c in enumerate(commands)) + "z LOGOUT\r\n"
        proc = subprocess.run(
            [str(DOVECOT_LIBEXEC / "imap"), "-c", str(conf)],
            input=script,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        return proc.stdout

    def deliver(sender: str) -> None:
        message = f"From: {sender}\r\nTo: {ADDR}\r\nSubject: x\r\n\r\nbody\r\n"
        cmd = [str(DOVECOT_LIBEXEC / "dovecot-lda"), "-c", str(conf), "-f", sender]
        proc = subprocess.run(
            (drop if as_root else []) + cmd,
            input=message,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr + (base / "dovecot.log").read_text()

    with MetadataDaemon(socket_path, ini_path):
        if as_root:  # on a relay both run as vmail; here the daemon stays root
            socket_path.chmod(0o666)
        answer = imap(
            'SETMETADATA INBOX (/private/devicetoken "ok-dovecot-device")',
            "GETMETADATA INBOX (/private/devicetoken)",
            'GETMETADATA "" (/shared/vendor/deltachat/maxsmtprecipients)',
            'GETMETADATA "" (/shared/vendor/deltachat/irohrelay)',
            'GETMETADATA "" (/shared/vendor/deltachat/nonsense)',
        )
        assert "a0 OK" in answer, answer
        assert "ok-dovecot-device" in answer.split("a1 OK")[0].split("a0 OK")[1]
        assert "1000" in answer.split("a2 OK")[0].split("a1 OK")[1]
        assert "https://chat.example.org" in answer
        assert "(/shared/vendor/deltachat/nonsense NIL)" in answer
        assert Metadata(config.mailboxes_path).get_tokens_for_addr(ADDR) == ["ok-dovecot-device"]

        deliver(ADDR)  # the sender's own copy notifies nobody
        time.sleep(1)
        assert push_service.tokens() == []
        deliver("other@chat.example.org")
        wait_for(lambda: push_service.tokens() == ["ok-dovecot-device"], 30)
        wait_for(lambda: queue_names(config.mailboxes_path / QUEUE_DIRNAME) == [], 30)
    assert len(list((base / "mailboxes" / ADDR / "new").iterdir())) == 2
