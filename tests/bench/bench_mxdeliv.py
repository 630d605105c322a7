"""Benchmark receiving: messages/s through POST /mxdeliv vs through port 25's filter.

    .venv/bin/python tests/bench/bench_mxdeliv.py [--messages 1000] [--rounds 3]

The same ~20 kB OpenPGP/MIME mails, one connection per message, 4 in parallel, to:

- **smtp** (the baseline): ``filtermail INI incoming``, what Postfix's port 25 proxies to;
- **https**: ``chatmail-mxdeliv INI``, the listener nginx passes /mxdeliv to (plain HTTP
  on loopback, as behind nginx).

Both are the real console entry points in subprocesses with the same checks (DKIM off on
both: FILTERMAIL_SKIP_DKIM=1, there is no DNS here) and reinject into the same recording
SMTP sink in this process. TLS and nginx are left out of both (Postfix's STARTTLS and
nginx's HTTPS cost about the same). Rounds alternate; medians are compared.
"""

from __future__ import annotations

import argparse
import http.client
import os
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(REPO / "tests" / "chatmaild"))
sys.path.insert(0, str(REPO))

from filtermail_support import LoopThread, Sink, encrypted_mail

from chatmaild.config import render_ini
from chatmaild.user import User

DOMAIN = "chat.example.org"
RCPT = f"bob@{DOMAIN}"
SENDER = "alice@other.example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{process.args} did not listen on {port}")


def send_smtp(port: int, mail: bytes) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as conn:
        conn.sendmail(SENDER, [RCPT], mail)


def send_https(port: int, mail: bytes) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/mxdeliv", mail, {"X-Mail-From": SENDER, "X-Mail-To": RCPT})
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"/mxdeliv answered {response.status}")


def run_round(send, port: int, mail: bytes, messages: int) -> float:
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: send(port, mail), range(messages)))
    return messages / (time.monotonic() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    loop_thread = LoopThread()
    sink = Sink(loop_thread)
    smtp_port, https_port = free_port(), free_port()
    processes = []
    with tempfile.TemporaryDirectory() as tmp:
        ini = Path(tmp) / "chatmail.ini"
        params = {
            "mail_domain": DOMAIN,
            "mailboxes_dir": f"{tmp}/mail",
            "counters_dir": f"{tmp}/counters",
            "filtermail_smtp_port_incoming": smtp_port,
            "filtermail_http_port_incoming": https_port,
            "postfix_reinject_port_incoming": sink.port,
        }
        ini.write_text(render_ini(params))
        user = User(Path(tmp) / "mail", RCPT)
        user.maildir.mkdir(parents=True)
        user.password_path.write_text("{SHA512-CRYPT}x")
        env = {**os.environ, "FILTERMAIL_SKIP_DKIM": "1"}
        python = sys.executable
        try:
            for cmd, port in (
                ([python, "-m", "chatmaild.filtermail", str(ini), "incoming"], smtp_port),
                ([python, "-m", "chatmaild.mxdeliv", str(ini)], https_port),
            ):
                process = subprocess.Popen(cmd, env=env, stderr=subprocess.DEVNULL, cwd=REPO)
                processes.append(process)
                wait_for_port(port, process)
            mail = encrypted_mail(SENDER, RCPT)
            rates: dict[str, list[float]] = {"smtp": [], "https": []}
            for _ in range(args.rounds):
                rates["smtp"].append(run_round(send_smtp, smtp_port, mail, args.messages))
                rates["https"].append(run_round(send_https, https_port, mail, args.messages))
        finally:
            for process in processes:
                process.terminate()
                process.wait(10)
            sink.stop()
            loop_thread.stop()
    smtp, https = (statistics.median(rates[k]) for k in ("smtp", "https"))
    print(f"{len(mail)} B messages, {args.messages} per round, {args.rounds} rounds, 4 clients")
    print(
        f"port 25 filter (baseline): {smtp:7.1f} msg/s  rounds {[round(r) for r in rates['smtp']]}"
    )
    print(
        f"/mxdeliv listener:         {https:7.1f} msg/s  rounds {[round(r) for r in rates['https']]}"
    )
    print(f"ratio /mxdeliv / port 25:  {https / smtp:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
