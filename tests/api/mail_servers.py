"""Submission (STARTTLS + AUTH) and IMAPS servers on loopback ports for the probe tests.

Postfix and Dovecot must not run on the test host (the relay containers share its
network), so the probe meets small real servers instead: aiosmtpd for submission, whose
handler applies chatmaild's own outgoing encryption rule (what filtermail enforces), and
a minimal IMAP4rev1 server over TLS speaking the commands the probe uses.
"""

from __future__ import annotations

import shlex
import socketserver
import ssl
import threading
from dataclasses import dataclass, field

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from chatmaild.mailcheck import is_encrypted, parse_mail


@dataclass
class Mailboxes:
    passwords: dict[str, str] = field(default_factory=dict)  # created at first login
    messages: dict[str, list[bytes]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    creation_closed: bool = False  # as /etc/chatmail-nocreate: unknown users are refused

    def login(self, user: str, password: str) -> bool:
        with self.lock:
            if self.creation_closed and user not in self.passwords:
                return False
            return self.passwords.setdefault(user, password) == password


class SubmissionHandler:
    def __init__(self, boxes: Mailboxes):
        self.boxes = boxes

    async def handle_DATA(self, server, session, envelope):
        if not is_encrypted(parse_mail(envelope.original_content), outgoing=True):
            return "523 Encryption Needed: Invalid Unencrypted Mail"
        with self.boxes.lock:
            for rcpt in envelope.rcpt_tos:
                self.boxes.messages.setdefault(rcpt, []).append(envelope.original_content)
        return "250 OK"


class Authenticator:
    def __init__(self, boxes: Mailboxes):
        self.boxes = boxes

    def __call__(self, server, session, envelope, mechanism, auth_data):
        # handled=False: aiosmtpd then answers a failure with 535 itself (else it stays silent)
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = auth_data.login.decode(), auth_data.password.decode()
        return AuthResult(success=self.boxes.login(user, password), handled=False)


def start_submission(boxes: Mailboxes, tls: ssl.SSLContext, port: int) -> Controller:
    controller = Controller(
        SubmissionHandler(boxes),
        hostname="127.0.0.1",
        port=port,
        tls_context=tls,
        require_starttls=True,
        auth_require_tls=True,
        authenticator=Authenticator(boxes),
    )
    controller.start()
    return controller


class IMAPHandler(socketserver.StreamRequestHandler):
    boxes: Mailboxes

    def send(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")

    def handle(self) -> None:
        user = None
        deleted: set[int] = set()
        self.send("* OK IMAP4rev1 test server ready")
        while raw := self.rfile.readline(65536):
            try:
                tag, command, *args = shlex.split(raw.decode().strip())
            except ValueError:
                self.send("* BAD parse error")
                continue
            command = command.upper()
            inbox = self.boxes.messages.get(user, []) if user else []
            if command == "CAPABILITY":
                self.send("* CAPABILITY IMAP4rev1")
            elif command == "LOGIN" and len(args) == 2 and self.boxes.login(*args):
                user = args[0]
            elif command == "LOGIN":
                self.send(f"{tag} NO [AUTHENTICATIONFAILED] wrong password")
                continue
            elif command == "LOGOUT":
                self.send("* BYE")
                self.send(f"{tag} OK LOGOUT completed")
                return
            elif user is None:
                self.send(f"{tag} NO login first")
                continue
            elif command == "SELECT":
                self.send(f"* {len(inbox)} EXISTS")
            elif command == "SEARCH" and args[:2] == ["HEADER", "Message-ID"]:
                hits = [str(i + 1) for i, m in enumerate(inbox) if args[2].encode() in m]
                self.send("* SEARCH " + " ".join(hits))
            elif command == "SEARCH":
                self.send("* SEARCH " + " ".join(str(i + 1) for i in range(len(inbox))))
            elif command == "STORE":
                deleted.add(int(args[0]))
            elif command == "EXPUNGE":
                with self.boxes.lock:
                    self.boxes.messages[user] = [
                        m for i, m in enumerate(inbox) if i + 1 not in deleted
                    ]
                deleted.clear()
            else:
                self.send(f"{tag} BAD unknown command")
                continue
            self.send(f"{tag} OK {command} completed")


class IMAPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, boxes: Mailboxes, tls: ssl.SSLContext):
        handler = type("Handler", (IMAPHandler,), {"boxes": boxes})
        super().__init__(("127.0.0.1", 0), handler)
        self.tls = tls

    def get_request(self):
        sock, address = super().get_request()
        return self.tls.wrap_socket(sock, server_side=True), address


def start_imaps(boxes: Mailboxes, tls: ssl.SSLContext) -> IMAPServer:
    server = IMAPServer(boxes, tls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
