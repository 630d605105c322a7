"""chatmail-metadata: token storage, the METADATA dict protocol, shared keys."""

from __future__ import annotations

import io
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from chatmaild.counters import Counters
from chatmaild.dictproxy import DictClient
from chatmaild.filedict import FileDict
from chatmaild.metadata import (
    TOKEN_LIFETIME_S,
    Metadata,
    MetadataDictProxy,
    MetadataKey,
    main,
    parse_key,
    read_appversions,
    valid_tokens,
    validate_appversions,
)
from chatmaild.notifier import QUEUE_DIRNAME, Notifier, parse_entry

ADDR = "user1@chat.example.org"
GUID = "43f5f508a7ea0366dff30200c15250e3"
VENDOR = "vendor/vendor.dovecot/pvt/server/vendor/deltachat"


@pytest.fixture
def config(make_config):
    return make_config("chat.example.org")


@pytest.fixture
def metadata(config):
    return Metadata(config.mailboxes_path)


@pytest.fixture
def notifier(config, metadata):
    """A notifier whose threads are not started: queued items stay visible on disk."""
    queue_dir = config.mailboxes_path / QUEUE_DIRNAME
    queue_dir.mkdir()
    return Notifier(queue_dir, metadata, "http://127.0.0.1:9/notify", Counters(None, "metadata"))


@pytest.fixture
def proxy(config, metadata, notifier):
    return MetadataDictProxy(config, metadata, notifier, turn_timeout=0.5)


def talk(proxy: MetadataDictProxy, *lines: str | bytes) -> str:
    """Feed request lines to the proxy as Dovecot would; return everything it answered."""
    raw = b"".join((line if isinstance(line, bytes) else line.encode()) + b"\n" for line in lines)
    out = io.BytesIO()
    proxy.handle_connection(io.BytesIO(raw), out)
    return out.getvalue().decode()


def queue_files(config) -> list[Path]:
    return sorted((config.mailboxes_path / QUEUE_DIRNAME).iterdir())


# -- token storage -----------------------------------------------------------------


def test_token_roundtrip_and_persistence(config, metadata):
    assert metadata.get_tokens_for_addr(ADDR) == []
    metadata.add_token_to_addr(ADDR, "tok1")
    metadata.add_token_to_addr(ADDR, "tok2")
    metadata.add_token_to_addr(ADDR, "tok1")
    assert sorted(Metadata(config.mailboxes_path).get_tokens_for_addr(ADDR)) == ["tok1", "tok2"]
    stored = json.loads((config.mailboxes_path / ADDR / "metadata.json").read_text())
    assert set(stored["devicetoken"]) == {"tok1", "tok2"}
    assert all(isinstance(ts, int) for ts in stored["devicetoken"].values())
    metadata.remove_token_from_addr(ADDR, "tok1")
    assert metadata.get_tokens_for_addr(ADDR) == ["tok2"]


def test_remove_token_of_unknown_account_creates_nothing(config, metadata):
    metadata.remove_token_from_addr("nobody@chat.example.org", "tok")
    assert not (config.mailboxes_path / "nobody@chat.example.org").exists()


def test_tokens_expire_after_90_days(metadata):
    now = time.time()
    metadata.add_token_to_addr(ADDR, "old", now=now - TOKEN_LIFETIME_S - 10)
    metadata.add_token_to_addr(ADDR, "recent", now=now - TOKEN_LIFETIME_S + 3600)
    # filtered on read ...
    assert metadata.get_tokens_for_addr(ADDR, now=now) == ["recent"]
    # ... and pruned from the file on the next modification
    metadata.add_token_to_addr(ADDR, "new", now=now)
    stored = metadata._filedict(ADDR).read()["devicetoken"]
    assert set(stored) == {"recent", "new"}


def test_refreshing_a_token_extends_its_life(metadata):
    now = time.time()
    metadata.add_token_to_addr(ADDR, "tok", now=now - TOKEN_LIFETIME_S + 60)
    metadata.add_token_to_addr(ADDR, "tok", now=now)
    assert metadata.get_tokens_for_addr(ADDR, now=now + 3600) == ["tok"]


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        (["t1", "t2"], {"t1", "t2"}),
        ({"t1": "yesterday", "t2": None, "t3": True}, set()),
        ({"t1": 1e12}, set()),  # far future: garbage, not a token
        ("t1 t2", set()),
        (None, set()),
    ],
    ids=["legacy-list", "non-numeric-ts", "future-ts", "string", "none"],
)
def test_valid_tokens_of_odd_stored_values(stored, expected):
    assert set(valid_tokens(stored, time.time())) == expected


def test_legacy_token_list_is_migrated(config, metadata):
    path = config.mailboxes_path / ADDR / "metadata.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"devicetoken": ["legacy1", "legacy2"]}))
    assert sorted(metadata.get_tokens_for_addr(ADDR)) == ["legacy1", "legacy2"]
    metadata.add_token_to_addr(ADDR, "new")
    stored = json.loads(path.read_text())["devicetoken"]
    assert isinstance(stored, dict)
    assert set(stored) == {"legacy1", "legacy2", "new"}


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[1, 2]", b"\xff\xfe\x00garbage", b'{"devicetoken": 17}'],
    ids=["broken-json", "empty", "list", "binary", "wrong-type"],
)
def test_corrupt_metadata_json_is_logged_and_treated_as_empty(config, metadata, caplog, content):
    path = config.mailboxes_path / ADDR / "metadata.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING):
        assert metadata.get_tokens_for_addr(ADDR) == []
    if content != b'{"devicetoken": 17}':
        assert "corrupt serialization state" in caplog.text
    metadata.add_token_to_addr(ADDR, "fresh")
    assert metadata.get_tokens_for_addr(ADDR) == ["fresh"]
    assert json.loads(path.read_text())["devicetoken"].keys() == {"fresh"}


def test_concurrent_token_writes_lose_nothing(config, metadata):
    def add(i):
        Metadata(config.mailboxes_path).add_token_to_addr(ADDR, f"tok{i}")

    threads = [threading.Thread(target=add, args=(i,)) for i in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(metadata.get_tokens_for_addr(ADDR)) == sorted(f"tok{i}" for i in range(30))
    leftovers = [p.name for p in (config.mailboxes_path / ADDR).iterdir()]
    assert sorted(leftovers) == ["metadata.json", "metadata.json.lock"]


def test_filedict_exception_leaves_file_unchanged(tmp_path):
    filedict = FileDict(tmp_path / "d.json")
    with filedict.modify() as data:
        data["a"] = 1
    with pytest.raises(RuntimeError), filedict.modify() as data:
        data["a"] = 2
        raise RuntimeError("boom")
    assert filedict.read() == {"a": 1}


# -- key parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (f"priv/{GUID}/devicetoken", MetadataKey("priv", GUID, "devicetoken")),
        (f"shared/{GUID}/{VENDOR}/turn", MetadataKey("shared", GUID, f"{VENDOR}/turn")),
        ("priv/devicetoken", None),
        (f"public/{GUID}/devicetoken", None),
        (f"priv/{GUID}/", None),
        ("", None),
    ],
    ids=["priv", "shared", "no-guid", "bad-scope", "no-name", "empty"],
)
def test_parse_key(key, expected):
    assert parse_key(key) == expected


# -- dict protocol: device tokens and messagenew -----------------------------------


def test_lookup_tokens(proxy, metadata):
    assert talk(proxy, f"Lpriv/{GUID}/devicetoken\t{ADDR}") == "O\n"
    metadata.add_token_to_addr(ADDR, "01234")
    assert talk(proxy, f"Lpriv/{GUID}/devicetoken\t{ADDR}") == "O01234\n"
    metadata.add_token_to_addr(ADDR, "56789")
    answer = talk(proxy, f"Lpriv/{GUID}/devicetoken\t{ADDR}")
    assert sorted(answer[1:].split()) == ["01234", "56789"]


def test_set_token_then_messagenew_queues_one_item_per_token(config, proxy, metadata):
    answer = talk(
        proxy,
        "H3\t2\t0\t\tmetadata",
        f"B1\t{ADDR}",
        f"S1\tpriv/{GUID}/devicetoken\tdevice-a",
        "C1",
        f"B2\t{ADDR}",
        f"S2\tpriv/{GUID}/devicetoken\tdevice-b",
        "C2",
    )
    assert answer == "O1\nO2\n"
    assert sorted(metadata.get_tokens_for_addr(ADDR)) == ["device-a", "device-b"]
    assert queue_files(config) == []
    answer = talk(proxy, f"B3\t{ADDR}", f"S3\tpriv/{GUID}/messagenew\t", "C3")
    assert answer == "O3\n"
    entries = [parse_entry(p.read_bytes()) for p in queue_files(config)]
    assert sorted(e.token for e in entries) == ["device-a", "device-b"]
    assert {e.addr for e in entries} == {ADDR}
    assert all(abs(e.start_ts - time.time()) < 10 for e in entries)


def test_messagenew_without_tokens_queues_nothing(config, proxy):
    assert talk(proxy, f"B1\t{ADDR}", f"S1\tpriv/{GUID}/messagenew\t", "C1") == "O1\n"
    assert queue_files(config) == []


@pytest.mark.parametrize(
    "key",
    [f"priv/{GUID}/unknown", f"shared/{GUID}/devicetoken", "garbage", f"priv/{GUID}/"],
    ids=["unknown-name", "shared-scope", "garbage", "empty-name"],
)
def test_set_unknown_key_fails_transaction(proxy, metadata, key):
    assert talk(proxy, f"B1\t{ADDR}", f"S1\t{key}\tvalue", "C1") == "F1\n"
    assert metadata.get_tokens_for_addr(ADDR) == []


@pytest.mark.parametrize("token", ["", " ", "two words", "tab\x01tinside"], ids=repr)
def test_set_bad_token_fails_transaction(proxy, metadata, token):
    assert talk(proxy, f"B1\t{ADDR}", f"S1\tpriv/{GUID}/devicetoken\t{token}", "C1") == "F1\n"
    assert metadata.get_tokens_for_addr(ADDR) == []


def test_set_for_invalid_user_fails_transaction(proxy, config):
    answer = talk(proxy, "B1\t../etc@x", f"S1\tpriv/{GUID}/devicetoken\ttok", "C1")
    assert answer == "F1\n"
    assert not (config.mailboxes_path.parent / "etc@x").exists()


def test_iterate_returns_empty_list(proxy):
    assert talk(proxy, f"I0\t0\tpriv/{GUID}/\t{ADDR}") == "\n"


# -- dict protocol: shared keys ------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [
        f"priv/{GUID}/messagenew",
        f"priv/{GUID}/unknown",
        f"shared/{GUID}/{VENDOR}/unknown",
        f"shared/{GUID}/maxsmtprecipients",
        f"shared/{GUID}/vendor/vendor.dovecot/pvt/server/vendor/other/turn",
        f"nonsense/{GUID}/{VENDOR}/maxsmtprecipients",
        "devicetoken",
    ],
    ids=[
        "messagenew",
        "priv-unknown",
        "vendor-unknown",
        "no-vendor-prefix",
        "other-vendor",
        "bad-scope",
        "bare",
    ],
)
def test_unknown_keys_are_not_found(proxy, key):
    assert talk(proxy, f"L{key}\t{ADDR}") == "N\n"


def test_maxsmtprecipients(proxy):
    assert talk(proxy, f"Lshared/{GUID}/{VENDOR}/maxsmtprecipients\t{ADDR}") == "O1000\n"


def test_irohrelay_default_is_the_relay_itself(proxy):
    answer = talk(proxy, f"Lshared/{GUID}/{VENDOR}/irohrelay\t{ADDR}")
    assert answer == "Ohttps://chat.example.org\n"


def test_irohrelay_configured_and_disabled(make_config, metadata, notifier):
    config = make_config("chat.example.org", iroh_relay="https://iroh.example.net")
    proxy = MetadataDictProxy(config, metadata, notifier)
    key = f"Lshared/{GUID}/{VENDOR}/irohrelay\t{ADDR}"
    assert talk(proxy, key) == "Ohttps://iroh.example.net\n"
    config = make_config("chat.example.org", iroh_relay="")
    proxy = MetadataDictProxy(config, metadata, notifier)
    assert talk(proxy, key) == "N\n"


def serve_turn(path: Path, line: bytes) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(8)

    def run():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(line)

    threading.Thread(target=run, daemon=True).start()
    return server


@pytest.mark.parametrize(
    ("mail_domain", "user", "expected"),
    [
        ("turn.example.org", ADDR, "Oturn.example.org:3478:user:pass\n"),
        ("1.2.3.4", "user@[1.2.3.4]", "O[1.2.3.4]:3478:user:pass\n"),
    ],
    ids=["domain", "ipv4-relay-bracketed"],
)
def test_turn_success(make_config, metadata, notifier, sock_dir, mail_domain, user, expected):
    path = sock_dir / "turn.socket"
    server = serve_turn(path, b"user:pass\n")
    try:
        config = make_config(mail_domain, turn_socket_path=path)
        proxy = MetadataDictProxy(config, metadata, notifier)
        assert talk(proxy, f"Lshared/{GUID}/{VENDOR}/turn\t{user}") == expected
    finally:
        server.close()


def test_turn_failures_answer_not_found(make_config, metadata, notifier, sock_dir, caplog):
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.bind(str(sock_dir / "silent.socket"))
    silent.listen(1)
    garbage = serve_turn(sock_dir / "garbage.socket", b"no credentials here\n")
    key = f"Lshared/{GUID}/{VENDOR}/turn\t{ADDR}"
    try:
        for name in ("absent.socket", "silent.socket", "garbage.socket"):
            config = make_config("chat.example.org", turn_socket_path=sock_dir / name)
            proxy = MetadataDictProxy(config, metadata, notifier, turn_timeout=0.3)
            with caplog.at_level(logging.WARNING):
                assert talk(proxy, key, "Lshared/x/y/z\tu@v") == "N\nN\n", name
        assert caplog.text.count("no TURN credentials") == 3
    finally:
        silent.close()
        garbage.close()


def test_appversions_shipped_file_is_valid_and_served_on_one_line(proxy):
    answer = talk(proxy, f"Lshared/{GUID}/{VENDOR}/appversions\t{ADDR}")
    assert answer.startswith("O{") and answer.endswith("}\n")
    assert answer.count("\n") == 1
    data = json.loads(answer[1:])
    validate_appversions(data)
    assert data["clients"][0]["sources"][0]["versionInteger"] > 0


GOOD_APPVERSIONS = {
    "clients": [
        {
            "clientId": "deltachat",
            "sources": [
                {
                    "sourceId": "gplay",
                    "versionInteger": 754,
                    "versionString": "2.57.0",
                    "downloadUrl": "https://download.delta.chat/x.apk",
                }
            ],
        }
    ]
}


def _mutated(change):
    data = json.loads(json.dumps(GOOD_APPVERSIONS))
    change(data)
    return data


@pytest.mark.parametrize(
    "data",
    [
        _mutated(lambda d: d.update(extra=1)),
        _mutated(lambda d: d["clients"].append(d["clients"][0])),
        _mutated(lambda d: d["clients"][0]["sources"][0].update(versionInteger=True)),
        _mutated(lambda d: d["clients"][0]["sources"][0].update(versionInteger=2**32)),
        _mutated(lambda d: d["clients"][0]["sources"][0].update(versionInteger="754")),
        _mutated(lambda d: d["clients"][0]["sources"][0].pop("versionString")),
        _mutated(lambda d: d["clients"][0]["sources"][0].update(downloadUrl="https://evil/x")),
        _mutated(lambda d: d["clients"][0]["sources"].append(d["clients"][0]["sources"][0])),
        [],
    ],
    ids=[
        "extra-key",
        "dup-client",
        "bool-version",
        "huge-version",
        "string-version",
        "missing-key",
        "foreign-url",
        "dup-source",
        "not-object",
    ],
)
def test_appversions_schema_rejects(data):
    validate_appversions(GOOD_APPVERSIONS)
    with pytest.raises(ValueError):
        validate_appversions(data)


def test_appversions_missing_or_invalid_answers_not_found(
    config, metadata, notifier, tmp_path, caplog
):
    key = f"Lshared/{GUID}/{VENDOR}/appversions\t{ADDR}"
    path = tmp_path / "appversions.json"
    proxy = MetadataDictProxy(config, metadata, notifier, appversions_path=path)
    with caplog.at_level(logging.WARNING):
        assert talk(proxy, key) == "N\n"
        path.write_text("{broken")
        assert talk(proxy, key) == "N\n"
        path.write_text(json.dumps({"clients": "nope"}))
        assert talk(proxy, key) == "N\n"
    assert caplog.text.count("not serving appversions") == 3
    # operators may edit the file: the next lookup serves the new content
    path.write_text(json.dumps(GOOD_APPVERSIONS, indent=4))
    assert talk(proxy, key) == "O" + json.dumps(GOOD_APPVERSIONS, separators=(",", ":")) + "\n"
    assert read_appversions(path) == json.dumps(GOOD_APPVERSIONS, separators=(",", ":"))


# -- bad input -----------------------------------------------------------------------


def test_garbage_lines_are_skipped_and_serving_continues(proxy, metadata, caplog):
    metadata.add_token_to_addr(ADDR, "tok")
    with caplog.at_level(logging.WARNING):
        answer = talk(
            proxy,
            b"\xff\xfe\x00binary",
            b"Zunknown command",
            b"Inot-a-number\tx",
            b"S99\tpriv/g/devicetoken\torphan",  # write to a transaction never begun
            b"C77",  # commit of an unknown transaction
            b"X" * 70000,  # longer than any dict request
            f"Lpriv/{GUID}/devicetoken\t{ADDR}".encode(),
        )
    assert answer == "F77\nOtok\n"
    assert metadata.get_tokens_for_addr(ADDR) == ["tok"]


def test_real_socket_serves_after_a_client_sent_garbage(proxy, metadata, sock_dir, serve_dict):
    metadata.add_token_to_addr(ADDR, "tok")
    path = serve_dict(proxy, sock_dir / "metadata.socket")
    with socket.socket(socket.AF_UNIX) as bad:
        bad.connect(str(path))
        bad.sendall(b"\x00\xffgarbage\nLpriv/half")  # then hang up mid-line

    with DictClient(path, timeout=5, dict_name="metadata") as good:
        assert good.lookup(f"priv/{GUID}/devicetoken", ADDR) == "tok"
        assert good.set_values({f"priv/{GUID}/devicetoken": "tok2"}, ADDR)
        assert not good.set_values({f"priv/{GUID}/nonsense": "x"}, ADDR)
        assert good.lookup(f"shared/{GUID}/{VENDOR}/maxsmtprecipients", ADDR) == "1000"
    assert sorted(metadata.get_tokens_for_addr(ADDR)) == ["tok", "tok2"]


def test_main_exits_1_without_mailboxes_dir(make_config, ini_path, tmp_path, sock_dir):
    make_config("chat.example.org", mailboxes_dir=tmp_path / "missing")
    assert main([str(sock_dir / "m.socket"), str(ini_path)]) == 1
    assert not (sock_dir / "m.socket").exists()


def test_main_exits_2_on_bad_ini(tmp_path, sock_dir):
    ini = tmp_path / "bad.ini"
    ini.write_text("[params]\nmax_mailbox_size = lots\n")
    assert main([str(sock_dir / "m.socket"), str(ini)]) == 2
