"""The dict-protocol base: pure parsing, the connection loop, and a real UNIX socket."""

from __future__ import annotations

import io

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatmaild.dictproxy import (
    Begin,
    Commit,
    DictClient,
    DictError,
    DictProxy,
    Hello,
    Ignored,
    Iterate,
    Lookup,
    ProtocolError,
    Rollback,
    Set,
    Unset,
    _escape_tab,
    _unescape_tab,
    parse_request,
)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("H3\t2\t0\t\tauth", Hello(("3", "2", "0", "", "auth"))),
        ("Lshared/userdb/a@x.org\ta@x.org", Lookup("shared/userdb/a@x.org", "a@x.org")),
        ("Lshared/key", Lookup("shared/key", "")),
        ("Lshared/a\x01tb\tu", Lookup("shared/a\tb", "u")),
        ("I0\t0\tshared/userdb/", Iterate(0, 0, "shared/userdb/", "")),
        ("I1\t5\tshared/x/\tu@x.org", Iterate(1, 5, "shared/x/", "u@x.org")),
        ("B1\tu@x.org", Begin("1", "u@x.org")),
        ("S1\tshared/k\tv\x01nw", Set("1", "shared/k", "v\nw")),
        ("U1\tshared/k", Unset("1", "shared/k")),
        ("C1", Commit("1")),
        ("D7", Commit("7", async_reply=True)),
        ("R1", Rollback("1")),
        ("T1\t12345\t0", Ignored("T")),
        ("A1\tshared/k\t1", Ignored("A")),
    ],
    ids=[
        "hello",
        "lookup",
        "lookup-no-user",
        "lookup-tab-escaped",
        "iterate",
        "iterate-flags-user",
        "begin",
        "set-newline-escaped",
        "unset",
        "commit",
        "async-commit",
        "rollback",
        "timestamp-ignored",
        "atomic-inc-ignored",
    ],
)
def test_parse_request(line, expected):
    assert parse_request(line) == expected


@pytest.mark.parametrize(
    "line",
    ["", "Zfoo", "Ix\t0\tp", "I0", "S1\tkey-without-value", "U1", "\x00"],
    ids=[
        "empty",
        "unknown-command",
        "iterate-bad-flags",
        "iterate-short",
        "set-short",
        "unset-short",
        "nul",
    ],
)
def test_parse_request_rejects(line):
    with pytest.raises(ProtocolError):
        parse_request(line)


@given(st.text())
def test_tab_escaping_roundtrips(value):
    escaped = _escape_tab(value)
    assert not any(c in escaped for c in "\t\n\r\0")
    assert _unescape_tab(escaped) == value


@given(st.text())
def test_parse_request_only_raises_protocol_error(line):
    try:
        parse_request(line)
    except ProtocolError:
        pass


class Echo(DictProxy):
    """Looks up by echoing; fails on 'boom'; writes go into ``written`` unless key is 'bad'."""

    def __init__(self):
        self.written: list[tuple[str, str, str]] = []

    def lookup(self, key, user):
        if key == "shared/boom":
            raise RuntimeError("exploded\tbadly")
        if key.startswith("shared/missing"):
            return None
        return f"{key}|{user}"

    def iterate(self, prefix, user):
        return ((f"{prefix}{i}", f"v{i}") for i in range(5))

    def set(self, user, key, value):
        self.written.append((user, key, value))
        return key != "shared/bad"


def converse(proxy: DictProxy, *lines: str | bytes) -> bytes:
    data = b"".join(x if isinstance(x, bytes) else x.encode() + b"\n" for x in lines)
    out = io.BytesIO()
    proxy.handle_connection(io.BytesIO(data), out)
    return out.getvalue()


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["H3\t2\t0\t\tauth"], b""),
        (["Lshared/k\tu"], b"Oshared/k|u\n"),
        (["Lshared/missing\tu"], b"N\n"),
        (["Lshared/boom\tu"], b"Fexploded\x01tbadly\n"),
        (["Lshared/a\x01nb\tu"], b"Oshared/a\x01nb|u\n"),
        (["I0\t0\tshared/p/"], b"".join(b"Oshared/p/%d\tv%d\n" % (i, i) for i in range(5)) + b"\n"),
        (["I0\t2\tshared/p/"], b"Oshared/p/0\tv0\nOshared/p/1\tv1\n\n"),
        (["B1\tu", "S1\tshared/k\tv", "C1"], b"O1\n"),
        (["B1\tu", "S1\tshared/bad\tv", "S1\tshared/k\tv", "C1"], b"F1\n"),
        (["B1\tu", "S1\tshared/k\tv", "D1"], b"AO1\n"),
        (["B1\tu", "S1\tshared/bad\tv", "D1"], b"AF1\n"),
        (["C9"], b"F9\n"),
        (["B1\tu", "R1", "C1"], b"F1\n"),
        (["garbage", "Lshared/k\tu"], b"Oshared/k|u\n"),
        ([b"\xff\xfe\n", "Lshared/k\tu"], b"Oshared/k|u\n"),
        ([b"L" + b"x" * 70000 + b"\n", "Lshared/k\tu"], b"Oshared/k|u\n"),
        (["", "", "Lshared/k\tu"], b"Oshared/k|u\n"),
    ],
    ids=[
        "hello-is-silent",
        "lookup-found",
        "lookup-not-found",
        "lookup-failure-escaped",
        "lookup-escaped-key",
        "iterate-ends-with-empty-line",
        "iterate-max-rows",
        "transaction-commit",
        "transaction-one-failed-write-fails-commit",
        "async-commit-reply",
        "async-commit-failure-reply",
        "commit-unknown-transaction",
        "rollback-forgets-transaction",
        "garbage-skipped",
        "invalid-utf8-skipped",
        "overlong-line-dropped",
        "empty-lines-skipped",
    ],
)
def test_handle_connection(lines, expected):
    assert converse(Echo(), *lines) == expected


def test_transactions_are_per_connection():
    """Dovecot reuses transaction id 1 on every connection: they must not mix."""
    proxy = Echo()
    assert converse(proxy, "B1\talice", "S1\tshared/k\ta") == b""
    assert converse(proxy, "B1\tbob", "S1\tshared/k\tb", "C1") == b"O1\n"
    assert proxy.written == [("alice", "shared/k", "a"), ("bob", "shared/k", "b")]


@pytest.fixture
def echo_socket(tmp_path, serve_dict):
    return serve_dict(Echo(), tmp_path / "echo.socket")


def test_real_socket_roundtrip(echo_socket):
    with DictClient(echo_socket) as client:
        assert client.lookup("shared/k", "u@x.org") == "shared/k|u@x.org"
        assert client.lookup("shared/missing") is None
        with pytest.raises(DictError):
            client.lookup("shared/boom")
        assert client.iterate("shared/p/")[:2] == [("shared/p/0", "v0"), ("shared/p/1", "v1")]
        assert client.set_values({"shared/k": "v"}) is True
        assert client.set_values({"shared/bad": "v"}) is False


def test_stale_socket_file_is_replaced(tmp_path):
    path = tmp_path / "stale.socket"
    path.write_text("left over from a crash")
    server = Echo().make_server(path)
    try:
        assert path.is_socket()
    finally:
        server.server_close()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(garbage=st.lists(st.text(max_size=80) | st.binary(max_size=80), max_size=4))
def test_random_lines_never_break_the_server(echo_socket, garbage):
    """Whatever a client sends, the server keeps its connection and answers the next lookup."""
    with DictClient(echo_socket, timeout=10) as client:
        for item in garbage:
            data = item if isinstance(item, bytes) else item.encode("utf-8", "surrogatepass")
            client.sock.sendall(data + b"\n")
        client.send("Lshared/canary\tu")
        # Garbage that happens to be a valid lookup/iterate/commit gets its own replies first.
        while client.read_line() != "Oshared/canary|u":
            pass


def test_unparsable_write_fails_its_transaction():
    import io

    from chatmaild.dictproxy import DictProxy

    class Store(DictProxy):
        def set(self, user, key, value):
            return True

    out = io.BytesIO()
    Store().handle_connection(io.BytesIO(b"B1\tu@x\nS1\tpriv/k\nC1\nB2\tu@x\nS2\tk\tv\nC2\n"), out)
    assert out.getvalue() == b"F1\nO2\n"


@pytest.mark.parametrize(
    ("escaped", "value"),
    [("a\x01xb", "axb"), ("a\x01", "a"), ("\x01\x01", "\x01"), ("\x010\x011", "\0\x01")],
    ids=["unknown-is-literal", "trailing-lone", "escaped-escape", "nul-and-soh"],
)
def test_tab_unescaping_is_dovecots(escaped, value):
    """Like Dovecot's str_tabunescape: an unknown escape stands for its character."""
    assert _unescape_tab(escaped) == value
