"""Benchmark: doveauth passdb lookups/s over 8 concurrent connections vs. a no-op responder.

Both servers are the same dict-proxy shell (``chatmaild.dictproxy``) in their own
process: ``doveauth SOCKET INI`` answering passdb lookups of existing accounts (parse
the escaped key, read the password file, JSON reply), and a bare ``DictProxy`` that
answers ``N`` to everything. Clients run in 8 separate processes (one connection each,
one request in flight, like Dovecot's auth workers), so client-side Python does not
share a GIL with the server. Prints both rates and the ratio (target >= 70 %).

Usage: .venv/bin/python tests/bench/bench_doveauth.py [--seconds 2] [--rounds 5]
                                                    [--special-password]
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

from chatmaild.accounts import get_or_create
from chatmaild.config import read_config, render_ini

DOMAIN = "bench.example.org"
CONNECTIONS = 8
ACCOUNTS = 64
# What chatmail-newcreds hands out (letters and digits); --special-password adds the
# characters Dovecot's %E escapes, which take doveauth's slower unescaping path.
PLAIN_PASSWORD = "k3x9qvb2m7wz4hta"
SPECIAL_PASSWORD = "bench\"pass\\word'1"


def escape(value: str) -> str:
    return "".join("\\" + c if c in "\\\"'" else c for c in value)


def request_line(i: int, password: str) -> bytes:
    addr = f"bench{i % ACCOUNTS:04d}@{DOMAIN}"
    return f'Lshared/passdb/{escape(password)}"{addr}\t{addr}\n'.encode()


def client(socket_path, seconds, start_at, expect, password, results) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    rfile = sock.makefile("rb")
    sock.sendall(b"H3\t2\t0\t\tauth\n")
    lines = [request_line(i, password) for i in range(ACCOUNTS)]
    while time.time() < start_at:
        time.sleep(0.001)
    count, deadline = 0, start_at + seconds
    while time.time() < deadline:
        sock.sendall(lines[count % ACCOUNTS])
        reply = rfile.readline()
        if not reply.startswith(expect):
            raise SystemExit(f"unexpected reply {reply[:80]!r}")
        count += 1
    sock.close()
    results.put(count)


def measure(socket_path: Path, seconds: float, expect: bytes, password: str) -> float:
    results: multiprocessing.Queue = multiprocessing.Queue()
    start_at = time.time() + 0.5
    procs = [
        multiprocessing.Process(
            target=client,
            args=(str(socket_path), seconds, start_at, expect, password, results),
        )
        for _ in range(CONNECTIONS)
    ]
    for proc in procs:
        proc.start()
    total = sum(results.get(timeout=seconds + 60) for _ in procs)
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit("a client failed")
    return total / seconds


def start_server(argv: list[str], socket_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen(argv, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not socket_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"server {argv[0]} did not start")
        time.sleep(0.05)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--special-password", action="store_true", help=f"use {SPECIAL_PASSWORD!r}")
    args = parser.parse_args()
    password = SPECIAL_PASSWORD if args.special_password else PLAIN_PASSWORD

    with tempfile.TemporaryDirectory(prefix="bench-doveauth-") as tmp:
        tmp_path = Path(tmp)
        ini = tmp_path / "chatmail.ini"
        ini.write_text(
            render_ini(
                {
                    "mail_domain": DOMAIN,
                    "mailboxes_dir": tmp_path / "mailboxes",
                    "counters_dir": tmp_path / "counters",
                    "nocreate_file": tmp_path / "nocreate",
                    "max_load_1m": 99999,
                    "min_available_memory": "0",
                    "min_free_disk_space": "0",
                }
            )
        )
        config = read_config(ini)
        config.mailboxes_path.mkdir()
        for i in range(ACCOUNTS):
            assert get_or_create(config, f"bench{i:04d}@{DOMAIN}", password).password_hash

        bindir = Path(sys.executable).parent
        auth_socket, noop_socket = tmp_path / "doveauth.socket", tmp_path / "noop.socket"
        noop_code = (
            "import sys; from chatmaild.dictproxy import DictProxy; "
            "DictProxy().serve_forever(sys.argv[1])"
        )
        servers = [
            start_server([str(bindir / "doveauth"), str(auth_socket), str(ini)], auth_socket),
            start_server([sys.executable, "-c", noop_code, str(noop_socket)], noop_socket),
        ]
        try:
            doveauth_rates, noop_rates = [], []
            # Pairs measured back to back, so load from other processes hits both alike.
            for _ in range(args.rounds):
                noop_rates.append(measure(noop_socket, args.seconds, b"N", password))
                doveauth_rates.append(measure(auth_socket, args.seconds, b'O{"addr"', password))
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=10)

    def rounds(rates: list[float]) -> str:
        return ", ".join(f"{rate:.0f}" for rate in rates)

    ratios = [d / n for d, n in zip(doveauth_rates, noop_rates, strict=True)]
    print(f"connections:          {CONNECTIONS} (one request in flight each)")
    print(f"rounds:               {args.rounds} pairs x {args.seconds:g} s, medians reported")
    print(f"password:             {password!r}")
    print(f"no-op responder:      {median(noop_rates):10.0f} lookups/s  ({rounds(noop_rates)})")
    doveauth = median(doveauth_rates)
    print(f"doveauth passdb:      {doveauth:10.0f} lookups/s  ({rounds(doveauth_rates)})")
    print(
        f"ratio doveauth/no-op: {median(ratios):10.1%}  (per pair: "
        f"{', '.join(f'{r:.0%}' for r in ratios)}; target >= 70 %)"
    )


if __name__ == "__main__":
    main()
