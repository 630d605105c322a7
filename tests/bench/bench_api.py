"""Latency of /health, /status, /metrics and GET /accounts (first page, and a prefix
filter) with 1,000 and 100,000 accounts on disk.

Synthetic mailboxes (password file, cur/ and new/ with one message) are created in a
temporary directory; ``chatmail-api --settings`` runs as a real uvicorn process on a
loopback port; requests are sequential over one keep-alive connection. The 1,000-account
run is the baseline: the ratio column shows how much slower the same endpoint is with
100,000 accounts (targets: p99 < 50 ms for /status, < 100 ms for /metrics, flat), and
GET /accounts' p99 is also given as a multiple of /status' p99 in the same run. The
account list is the index chatmail-accountstats writes (as the relay's timer does). Both
relays run at once and requests alternate between them in batches, so load from other
work on the host hits both alike.

    .venv/bin/python tests/bench/bench_api.py [--accounts 1000 100000] [--requests 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from chatmaild.accountstats import scan_mailboxes, write_index
from chatmaild.config import render_ini

DOMAIN = "bench.example.org"
MONITOR_TOKEN = "bench-monitor-token-0123456789"
ENDPOINTS = ("/health", "/status", "/metrics", "/accounts", "/accounts?prefix=user0421")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_mailboxes(root: Path, count: int) -> None:
    now = time.time()
    for i in range(count):
        maildir = root / f"user{i:06d}@{DOMAIN}"
        (maildir / "cur").mkdir(parents=True)
        (maildir / "new").mkdir()
        (maildir / "cur" / f"{i}.msg:2,S").write_bytes(b"x" * 2048)
        password = maildir / "password"
        password.write_text("{SHA512-CRYPT}$6$salt$hash")
        age = (i % 200) * 86400
        os.utime(password, (now - age, now - age))


def make_cert(path: Path) -> None:
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-noenc",
            "-days",
            "30",
            "-keyout",
            str(path.with_suffix(".key")),
            "-out",
            str(path),
            "-subj",
            f"/CN={DOMAIN}",
        ],
        check=True,
        capture_output=True,
    )


def start_api(
    work: Path, mailboxes: Path, listen_port: int, scan_interval: float
) -> tuple[subprocess.Popen, str]:
    """``chatmail-api`` on its own port for the relay whose mailboxes are ``mailboxes``."""
    ini = work / "chatmail.ini"
    ini.write_text(
        render_ini(
            {
                "mail_domain": DOMAIN,
                "mailboxes_dir": mailboxes,
                "counters_dir": work / "counters",
                "nocreate_file": work / "nocreate",
                "blocklist_file": work / "blocked.json",
                "max_load_1m": 10000,
                "min_available_memory": "1M",
                "min_free_disk_space": "1M",
            }
        )
    )
    (work / "counters").mkdir(exist_ok=True)
    rows: list = []
    write_index(rows, scan_mailboxes(mailboxes, index=rows).scanned_at, work / "accounts.json")
    (work / "version").write_text("bench\n")
    cert = work / "cert.pem"
    make_cert(cert)
    port = free_port()
    settings = {
        "chatmail_ini": str(ini),
        "listen": "127.0.0.1",
        "port": port,
        "state_dir": str(work / "state"),
        "tokens": {"monitor": {"bench": MONITOR_TOKEN}},
        "version_file": str(work / "version"),
        "tls_cert": str(cert),
        "service_manager": "systemd",
        "mta": "postfix",
        "services": [],
        "ports": [{"port": listen_port}],
        "queue_command": ["true"],
        "account_scan_interval_s": scan_interval,
        "account_stats_file": None,
        "account_index_file": str(work / "accounts.json"),
        "dns": {"check_interval_s": 0, "dkim_selector": "opendkim", "dkim_txt": str(work / "dkim")},
        "probe": {"enabled": False, "interval_s": 0, "submission_port": 587, "imap_port": 993},
    }
    (work / "api.json").write_text(json.dumps(settings))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chatmail_api.main",
            "--settings",
            str(work / "api.json"),
            "--log-level",
            "warning",
        ],
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("chatmail-api did not start")


def wait_for_scan(client: httpx.Client, count: int) -> float:
    started = time.monotonic()
    want = f'chatmail_accounts{{kind="all"}} {float(count)}'
    while time.monotonic() - started < 600:
        if want in client.get("/metrics").text:
            return time.monotonic() - started
        time.sleep(0.2)
    raise SystemExit("account scan did not finish")


def measure(clients: dict[int, httpx.Client], path: str, requests: int, rounds: int = 20):
    """Alternate batches between the relays so both see the same load on a shared host."""
    samples: dict[int, list[float]] = {count: [] for count in clients}
    for client in clients.values():
        for _ in range(20):
            client.get(path)  # warm-up
    for _ in range(rounds):
        for count, client in clients.items():
            for _ in range(requests // rounds):
                started = time.perf_counter()
                response = client.get(path)
                samples[count].append((time.perf_counter() - started) * 1000)
                if response.status_code >= 500:
                    raise SystemExit(f"{path}: {response.status_code}")
    out = {}
    for count, values in samples.items():
        values.sort()
        out[count] = (statistics.median(values), values[int(len(values) * 0.99) - 1])
    return out


def run(
    counts: list[int], requests: int, scan_interval: float
) -> dict[int, dict[str, tuple[float, float]]]:
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp, socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        procs, clients = [], {}
        headers = {"Authorization": f"Bearer {MONITOR_TOKEN}"}
        try:
            for count in counts:
                work = Path(tmp) / str(count)
                mailboxes = work / "mailboxes"
                mailboxes.mkdir(parents=True)
                started = time.monotonic()
                make_mailboxes(mailboxes, count)
                print(
                    f"{count:>7} accounts created in {time.monotonic() - started:.1f} s", flush=True
                )
                proc, url = start_api(work, mailboxes, sock.getsockname()[1], scan_interval)
                procs.append(proc)
                clients[count] = httpx.Client(base_url=url, headers=headers, timeout=30)
                scan_s = wait_for_scan(clients[count], count)
                print(
                    f"{count:>7} accounts: first background scan done after {scan_s:.1f} s",
                    flush=True,
                )
            by_path = {path: measure(clients, path, requests) for path in ENDPOINTS}
            return {c: {path: by_path[path][c] for path in ENDPOINTS} for c in counts}
        finally:
            for client in clients.values():
                client.close()
            for proc in procs:
                proc.terminate()
                proc.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accounts", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument(
        "--scan-interval",
        type=float,
        default=3600,
        help="seconds between in-process account scans (1: measure while scanning nonstop; "
        "on the relay a vmail timer scans and the API only reads its file)",
    )
    args = parser.parse_args()
    results = run(args.accounts, args.requests, args.scan_interval)
    baseline = results[args.accounts[0]]
    print(f"\n{'accounts':>8} {'endpoint':<9} {'p50 ms':>8} {'p99 ms':>8} {'p99 / baseline':>15}")
    for count, by_path in results.items():
        for path, (p50, p99) in by_path.items():
            ratio = p99 / baseline[path][1]
            print(f"{count:>8} {path:<9} {p50:>8.2f} {p99:>8.2f} {ratio:>15.2f}")
    print(f"\n{'accounts':>8} {'GET /accounts':<26} {'p99 / p99 of /status':>21}")
    for count, by_path in results.items():
        for path in ENDPOINTS[3:]:
            print(f"{count:>8} {path:<26} {by_path[path][1] / by_path['/status'][1]:>21.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
