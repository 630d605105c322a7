"""Salt execution module ``chatmail``: the operator's tools on every relay of a fleet.

    salt 'relay*' chatmail.status
    salt 'relay1' chatmail.account_info user@chat.example.org
    salt 'relay1' chatmail.block user@chat.example.org reason="spam wave"
    salt 'relay1' chatmail.unblock user@chat.example.org
    salt 'relay1' chatmail.delete_account user@chat.example.org reason=abuse
    salt 'relay*' chatmail.queue
    salt 'relay*' chatmail.creation enabled=False reason="spam wave"

One implementation with the control API: accounts and queue go to the same
chatmail-adminctl sockets the API uses (their paths from the API's settings file), status
and account creation to the API itself on loopback, with the relay's tokens. Mutations
are appended to the API's audit log as done by ``salt``. Shipped by the formula
(``salt/_modules`` at the top of its file root); Salt syncs it on ``state.apply`` (or
``saltutil.sync_modules``). It runs under Salt's own Python: stdlib only.
"""

import json
import os
import socket
import time
import urllib.error
import urllib.request

__virtualname__ = "chatmail"

#: Where the formula writes them (salt/chatmail/parameters/defaults.yaml api:); a minion
#: whose pillar moves them sets the minion options chatmail.api_settings / api_tokens.
DEFAULT_SETTINGS = "/etc/chatmail/api.json"
DEFAULT_TOKENS = "/etc/chatmail/api-tokens.json"
TIMEOUT_S = 60


def __virtual__():
    return __virtualname__


def _opt(name, default):
    try:
        return __opts__.get("chatmail." + name, default)
    except NameError:
        return default


def _settings():
    with open(_opt("api_settings", DEFAULT_SETTINGS)) as file:
        return json.load(file)


def _token(scope):
    with open(_opt("api_tokens", DEFAULT_TOKENS)) as file:
        tokens = json.load(file)[scope]
    return next(iter(tokens.values()))


def _adminctl(scope, op, args):
    path = _settings().get(scope + "_socket")
    if not path:
        raise RuntimeError("this relay runs no chatmail-adminctl (systemd only)")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(TIMEOUT_S)
        sock.connect(path)
        sock.sendall(json.dumps({"op": op, "args": args}).encode() + b"\n")
        with sock.makefile("rb") as reply_file:
            reply = json.loads(reply_file.readline())
    if not reply.get("ok"):
        raise RuntimeError("{}: {}".format(reply.get("status"), reply.get("error")))
    return reply["result"]


def _api(method, path, scope, body=None):
    settings = _settings()
    host = settings.get("listen", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
    request = urllib.request.Request(
        "http://{}:{}{}".format(host, settings["port"], path),
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": "Bearer " + _token(scope), "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{method} {path}: {exc.code} {detail}") from None


def _audit(action, **fields):
    path = os.path.join(_settings()["state_dir"], "audit.log")
    entry = {"ts": round(time.time(), 3), "action": action, "by": "salt", "client": "salt"}
    entry.update(fields)
    exists = os.path.exists(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(entry, sort_keys=True) + "\n").encode())
        if not exists:  # the API appends to it too
            state = os.stat(os.path.dirname(path))
            os.fchown(fd, state.st_uid, state.st_gid)
    finally:
        os.close(fd)


def status():
    """The relay's /status: ok|degraded|down and every check."""
    return _api("GET", "/status", "monitor")


def account_info(address):
    """Created, last login, storage against quota, messages, E2EE, push token, block."""
    return _adminctl("accounts", "info", {"address": address})


def block(address, reason=""):
    """Refuse the account's logins and incoming mail; its data stays."""
    result = _adminctl("accounts", "block", {"address": address, "reason": reason, "by": "salt"})
    if result["changed"]:
        _audit("block", address=address, reason=reason)
    return result


def unblock(address):
    """Lift a block (after a delete, the address may be created again by a login)."""
    result = _adminctl("accounts", "unblock", {"address": address, "by": "salt"})
    if result["changed"]:
        _audit("unblock", address=address)
    return result


def delete_account(address, reason=""):
    """Remove the mailbox and its data; the address stays blocked."""
    args = {"address": address, "reason": reason, "by": "salt"}
    result = _adminctl("accounts", "delete", args)
    _audit("delete", address=address, reason=reason, mailbox_removed=result["mailbox_removed"])
    return result


def queue():
    """The MTA's queue: id, arrival, size, recipient domains, last error."""
    return _adminctl("queue", "list", {})


def creation(enabled=None, reason=""):
    """Account creation now; with ``enabled=True|False`` open or close it first."""
    if enabled is None:
        return _api("GET", "/account-creation", "monitor")
    return _api("PUT", "/account-creation", "admin", {"enabled": bool(enabled), "reason": reason})
