"""Boot a chatmail relay in a systemd-nspawn container and apply the Salt formula to it.

Used by ``scripts/deploy`` (a persistent local relay) and by the container tests
(``tests/e2e``: a throw-away relay per test session). Standard library only, so it runs
with the host's ``/usr/bin/python3`` before any venv exists.

The base root filesystem (Debian bookworm minbase + systemd + Salt in a venv + the host's
extra CA certificates) is built once with debootstrap and cached as a tarball under
``/var/cache/chatmail-test``, keyed by a hash of everything that goes into it, so a change to
the recipe rebuilds it and a new machine builds it on first use. Downloaded .debs and pip
wheels are cached there too and bind-mounted into every container.

The container shares the host's network: the relay's ports appear on 127.0.0.1, and they
must be free on the host before a container boots. (``network_bridge`` gives a container a
network namespace of its own instead: the fleet lab, ``scripts/lib/lab.py``.)

CLI: ``python3 scripts/lib/relayctl.py up|destroy|status|shell|build`` (see ``main``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = Path(os.environ.get("CHATMAIL_TEST_CACHE", "/var/cache/chatmail-test"))
#: The Debian release a relay container runs unless told otherwise.
DEFAULT_SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates")
SALT_REQUIREMENT = "salt>=3008,<3009"
SALT_VENV = "/opt/salt"
#: Where the repository appears inside the container (read-only bind mount).
REPO_MOUNT = "/srv/chatmail"
#: The minion's file_roots: the formula and the repository root (the relay's Python source).
FILE_ROOTS = [f"{REPO_MOUNT}/salt", REPO_MOUNT]
#: A further file_root with package repositories the formula installs from, e.g.
#: salt://dovecot-packages/<codename> (chatmail:dovecot:packages patched).
PACKAGES_ROOT = "/srv/chatmail-packages"
#: Bump when the build recipe below changes in a way the hash inputs do not capture.
RECIPE_VERSION = "4"

#: Ports the relay binds in the host's network namespace: public ones, then loopback-only ones.
PUBLIC_PORTS = (25, 80, 143, 443, 465, 587, 993)
LOOPBACK_PORTS = (53, 8077, 8443, 10025, 10026, 10080, 10081, 10082, 10083, 10465, 10993)

#: Where the formula keeps the mailboxes (vmail's home), for a separate mail filesystem.
MAILBOXES_PARENT = "/home/vmail/mail"

PERSISTENT_ROOT = Path("/var/lib/machines/chatmail-relay")
PERSISTENT_STATE = Path("/var/lib/machines/chatmail-relay.json")
DEFAULT_DOMAIN = "_chatmail.test"

CONTAINER_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}


class RelayError(RuntimeError):
    """Something about the container or the host prevents the relay from running."""


def log(message: str) -> None:
    print(f"[relayctl {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- host checks --------------------------------------------------------------------------


def busy_ports(ports: tuple[int, ...] = PUBLIC_PORTS + LOOPBACK_PORTS) -> list[int]:
    """Ports on which something already listens (TIME_WAIT leftovers do not count)."""
    busy = []
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("0.0.0.0", port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                busy.append(port)
    return busy


def require_free_ports() -> None:
    busy = busy_ports()
    if busy:
        raise RelayError(
            f"ports {', '.join(map(str, busy))} are in use on this host; the relay container "
            "shares the host's network and needs them. Stop what listens there "
            "(`ss -ltnp`), e.g. a relay from `scripts/deploy` (`scripts/deploy --destroy`)."
        )


def require_tools() -> None:
    missing = [
        t for t in ("debootstrap", "systemd-nspawn", "nsenter", "zstd") if not shutil.which(t)
    ]
    if missing:
        raise RelayError(
            f"missing host tools: {', '.join(missing)} "
            "(apt-get install debootstrap systemd-container util-linux zstd)"
        )
    if os.geteuid() != 0:
        raise RelayError("booting containers needs root")


def host_ca_certs() -> list[Path]:
    """Extra CA certificates of the host (e.g. a TLS-intercepting egress proxy's)."""
    return sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt"))


def host_nameserver() -> str:
    """The host's first IPv4 resolver: the relay's unbound forwards to it."""
    for line in Path("/etc/resolv.conf").read_text().splitlines():
        parts = line.split()
        if (
            len(parts) >= 2
            and parts[0] == "nameserver"
            and ":" not in parts[1]
            and not parts[1].startswith("127.")
        ):
            return parts[1]
    return ""


# --- base root filesystem -----------------------------------------------------------------


def rootfs_key(suite: str) -> str:
    digest = hashlib.sha256()
    for part in (RECIPE_VERSION, suite, MIRROR, " ".join(BASE_PACKAGES), SALT_REQUIREMENT):
        digest.update(part.encode() + b"\0")
    for cert in host_ca_certs():
        digest.update(cert.name.encode() + b"\0" + cert.read_bytes())
    return digest.hexdigest()[:16]


def rootfs_tarball(suite: str) -> Path:
    return CACHE_DIR / f"rootfs-{suite}-{rootfs_key(suite)}.tar.zst"


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so finalizers still stop containers and remove the lab."""

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_host(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kwargs)


def ensure_rootfs(suite: str) -> Path:
    """The cached base tarball, built first if the recipe or the CA certs changed."""
    tarball = rootfs_tarball(suite)
    if tarball.exists():
        return tarball
    require_tools()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    lock_path = CACHE_DIR / "rootfs.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same one
        if tarball.exists():
            return tarball
        build_rootfs(tarball, suite)
    return tarball


def build_rootfs(tarball: Path, suite: str) -> None:
    started = time.monotonic()
    stage = CACHE_DIR / f"build-{tarball.name.removesuffix('.tar.zst')}"
    if stage.exists():
        remove_tree(stage)
    debs = CACHE_DIR / f"debootstrap-debs-{suite}"
    debs.mkdir(parents=True, exist_ok=True)
    log(f"building base rootfs {tarball.name} (debootstrap {suite}, ~1 min)")
    run_host(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            f"--cache-dir={debs}",
            suite,
            str(stage),
            MIRROR,
        ],
        stdout=subprocess.DEVNULL,
    )
    certs_dir = stage / "usr/local/share/ca-certificates"
    certs_dir.mkdir(parents=True, exist_ok=True)
    for cert in host_ca_certs():
        shutil.copy(cert, certs_dir / cert.name)
    # pip trusts its own bundle unless told otherwise; the system store has our CAs.
    (stage / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
    shutil.copy("/etc/resolv.conf", stage / "etc/resolv.conf")
    (stage / "etc/hostname").write_text("chatmail-relay\n")
    log(f"installing {SALT_REQUIREMENT} into {SALT_VENV} (~70 s)")
    # Salt's dependency timelib has no wheel on PyPI: it builds from source, so the compiler
    # is there only for the install (pip's cache keeps the built wheel for the next build).
    build_deps = "gcc libc6-dev python3-dev"
    script = (
        "set -e; export DEBIAN_FRONTEND=noninteractive; update-ca-certificates >/dev/null; "
        f"apt-get -q update >/dev/null; apt-get -qy install --no-install-recommends {build_deps} >/dev/null; "
        f"python3 -m venv {SALT_VENV}; "
        f"{SALT_VENV}/bin/pip install -q --disable-pip-version-check '{SALT_REQUIREMENT}'; "
        f"for b in salt-call salt-run; do ln -sf {SALT_VENV}/bin/$b /usr/local/bin/$b; done; "
        f"apt-get -qy purge --autoremove {build_deps} >/dev/null; "
        "apt-get clean; rm -rf /var/lib/apt/lists/*"
    )
    run_host(
        nspawn_base(stage)
        + ["--pipe", f"--bind={pip_cache()}:/root/.cache/pip", "/bin/sh", "-c", script],
    )
    partial = tarball.with_suffix(".partial")
    run_host(
        [
            "tar",
            "-C",
            str(stage),
            "--numeric-owner",
            "--xattrs",
            "-I",
            "zstd -T0 -3",
            "-cpf",
            str(partial),
            ".",
        ]
    )
    partial.rename(tarball)
    remove_tree(stage)
    for old in CACHE_DIR.glob(f"rootfs-{suite}-*.tar.zst"):
        if old != tarball:
            old.unlink()
    log(f"base rootfs built in {time.monotonic() - started:.0f} s: {tarball}")


def pip_cache() -> Path:
    path = CACHE_DIR / "pip"
    path.mkdir(parents=True, exist_ok=True)
    return path


def apt_cache(suite: str) -> Path:
    # one per release: apt must not pick a package built for another one
    path = CACHE_DIR / f"apt-archives-{suite}"
    (path / "partial").mkdir(parents=True, exist_ok=True)
    return path


def nspawn_base(root: Path) -> list[str]:
    return ["systemd-nspawn", "-D", str(root), "--register=no", "--keep-unit", "--quiet"]


def mounts_below(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4]
        if (mount_point + "/").startswith(prefix) or mount_point == prefix[:-1]:
            mounts.append(mount_point)
    return mounts


def remove_tree(path: Path) -> None:
    """rm -rf, but never through a mount point (a bind-mounted repository, say)."""
    if not path.exists():
        return
    leftover = mounts_below(path)
    if leftover:
        raise RelayError(f"refusing to remove {path}: still mounted: {leftover}")
    run_host(["rm", "-rf", "--one-file-system", str(path)])


def snapshot_repo(repo: Path, dest: Path) -> None:
    """Copy the checkout's sources (no VCS data, venvs or caches) to ``dest``."""
    shutil.copytree(
        repo,
        dest,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "node_modules",
            "__pycache__",
            ".pytest_cache",
            "*.egg-info",
            ".ruff_cache",
        ),
    )


# --- a booted container -------------------------------------------------------------------


@dataclass
class ApplyResult:
    """The outcome of one ``state.apply``: per-state results from salt's JSON output."""

    returncode: int
    seconds: float
    states: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    raw: str = ""

    @property
    def changed(self) -> dict:
        return {k: v for k, v in self.states.items() if v.get("changes")}

    @property
    def failed(self) -> dict:
        return {k: v for k, v in self.states.items() if v.get("result") is False}

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.errors and not self.failed and bool(self.states)

    def summary(self) -> str:
        lines = [
            (
                f"state.apply: rc={self.returncode} {len(self.states)} states, "
                f"{len(self.changed)} changed, {len(self.failed)} failed, {self.seconds:.1f} s"
            )
        ]
        lines += [f"  render error: {e}" for e in self.errors]
        for key, state in self.failed.items():
            comment = str(state.get("comment", "")).strip()
            lines.append(f"  FAILED {state.get('__id__', key)}: {comment[:2000]}")
        return "\n".join(lines)

    def changed_summary(self) -> str:
        return "\n".join(
            f"  changed {v.get('__id__', k)}: {json.dumps(v.get('changes'))[:300]}"
            for k, v in self.changed.items()
        )


class Relay:
    """One container: its root directory, its nspawn process and its init's PID."""

    def __init__(
        self,
        root: Path,
        name: str = "chatmail-relay",
        repo: Path = REPO_ROOT,
        pidfile: Path | None = None,
        suite: str = DEFAULT_SUITE,
        mail_fs_mb: int = 0,
        network_bridge: str = "",
        repo_mount: str = REPO_MOUNT,
        shared_apt_cache: bool = True,
    ):
        self.root = Path(root)
        #: "" = the host's network (ports on 127.0.0.1); a bridge name = a network
        #: namespace of its own, a veth into that bridge (the lab: scripts/lib/lab.py).
        self.network_bridge = network_bridge
        #: Where ``repo`` appears inside ("" = not at all: a minion of a salt master).
        self.repo_mount = repo_mount
        #: True: the suite's .deb cache is bind-mounted (apt in two containers at once
        #: fails on its lock). False: the container gets hard links to the cached .debs.
        self.shared_apt_cache = shared_apt_cache
        #: With mail_fs_mb, the mailboxes live on a loop-mounted ext4 of that size, mounted on
        #: the host at ``mail_fs`` (it survives a crash of the container; tests fill it up).
        self.mail_fs_mb = mail_fs_mb
        self.mail_fs = self.root.parent / f"{self.root.name}.mail"
        self._mail_image = self.root.parent / f"{self.root.name}.mail.img"
        self.suite = suite
        self.name = name
        self.repo = Path(repo)
        #: "<nspawn pid> <our pid>", written as soon as nspawn runs: lets a later session
        #: find and stop a container whose owner was killed.
        self.pidfile = pidfile
        self.nspawn_pid: int | None = None
        self.init_pid: int | None = None
        self.log_path = self.root.parent / f"{self.root.name}.console.log"

    # lifecycle

    def unpack(self) -> None:
        if self.root.exists():
            raise RelayError(f"{self.root} already exists")
        tarball = ensure_rootfs(self.suite)
        started = time.monotonic()
        self.root.mkdir(parents=True)
        run_host(
            [
                "tar",
                "-C",
                str(self.root),
                "--numeric-owner",
                "--xattrs",
                "-I",
                "zstd -T0",
                "-xpf",
                str(tarball),
            ]
        )
        log(f"unpacked {tarball.name} to {self.root} in {time.monotonic() - started:.1f} s")
        # Booted with --resolv-conf=off, as a real host keeps its resolv.conf across reboots
        # (nspawn's default would put the host's back on every boot, under a relay whose
        # /etc/resolv.conf points at its own unbound): until the formula's resolver state
        # takes over, the host's resolver of today, not of the day the rootfs was built.
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        if not self.shared_apt_cache:
            archives = self.root / "var/cache/apt/archives"
            archives.mkdir(parents=True, exist_ok=True)
            for deb in apt_cache(self.suite).glob("*.deb"):
                os.link(deb, archives / deb.name)
        if self.mail_fs_mb:
            self._make_mail_fs()

    def _make_mail_fs(self) -> None:
        # -m 0: no blocks reserved for root, so a full filesystem is full for every writer.
        # -i 4096: an inode per 4 KiB, not per 16 KiB: the benchmark's thousands of accounts
        # (about ten inodes each) ran a 512 MiB filesystem out of inodes, not of space.
        with open(self._mail_image, "wb") as image:
            image.truncate(self.mail_fs_mb << 20)
        run_host(["mkfs.ext4", "-q", "-m", "0", "-i", "4096", str(self._mail_image)])
        self.mail_fs.mkdir()
        run_host(["mount", "-o", "loop", str(self._mail_image), str(self.mail_fs)])
        os.chmod(self.mail_fs, 0o755)

    def boot(self, timeout: float = 120) -> None:
        require_tools()
        if not self.network_bridge:
            require_free_ports()
        cmd = nspawn_base(self.root) + [
            "-b",
            f"--machine={self.name}",
            "--console=read-only",
            "--resolv-conf=off",
            f"--bind={pip_cache()}:/root/.cache/pip",
        ]
        if self.shared_apt_cache:
            cmd.append(f"--bind={apt_cache(self.suite)}:/var/cache/apt/archives")
        if self.repo_mount:
            cmd.append(f"--bind-ro={self.repo}:{self.repo_mount}")
        if self.mail_fs.is_mount():
            cmd.append(f"--bind={self.mail_fs}:{MAILBOXES_PARENT}")
        if self.network_bridge:
            cmd.append(f"--network-bridge={self.network_bridge}")
        with open(self.log_path, "ab") as console:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.nspawn_pid = proc.pid
        self._proc = proc
        if self.pidfile:
            self.pidfile.write_text(f"{proc.pid} {os.getpid()}")
        try:
            self.init_pid = self._wait_for_init(timeout)
            state = self._wait_for_boot(timeout)
        except BaseException:
            self.shutdown()
            raise
        log(
            f"container {self.name} booted (nspawn {self.nspawn_pid}, init {self.init_pid}, {state})"
        )

    def attach(self, nspawn_pid: int) -> None:
        """Adopt a container booted earlier (by another process, e.g. `scripts/deploy`)."""
        self.nspawn_pid = nspawn_pid
        self._proc = None
        self.init_pid = self._wait_for_init(5)

    def is_running(self) -> bool:
        return self.nspawn_pid is not None and is_nspawn(self.nspawn_pid)

    def _wait_for_init(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RelayError(f"systemd-nspawn exited early; see {self.log_path}")
            pid = _container_init(self.nspawn_pid)
            if pid:
                return pid
            time.sleep(0.2)
        raise RelayError(f"no init process appeared in the container; see {self.log_path}")

    def _wait_for_boot(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RelayError(f"systemd-nspawn exited during boot; see {self.log_path}")
            res = self.run(["systemctl", "is-system-running"], check=False, timeout=30)
            state = res.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.5)
        raise RelayError(f"container did not finish booting (state {state!r}); see {self.log_path}")

    def shutdown(self, timeout: float = 60) -> None:
        """Stop the container (clean poweroff, then SIGKILL) and wait for nspawn to exit."""
        pid = self.nspawn_pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)  # nspawn asks the container's systemd to power off
        if not self._wait_exit(pid, timeout):
            log(f"container {self.name} did not power off in {timeout:.0f} s: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            if self.init_pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
            self._wait_exit(pid, 30)
        self.nspawn_pid = self.init_pid = None

    def crash(self) -> None:
        """SIGKILL the container as a power cut would (no shutdown); its files stay for boot()."""
        pid, init = self.nspawn_pid, self.init_pid
        if pid is None:
            raise RelayError("container is not running")
        for target in (init, pid):
            if target:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if not self._wait_exit(pid, 30):
            raise RelayError(f"container {self.name} survived SIGKILL")
        self.nspawn_pid = self.init_pid = None
        # The kernel reaps the container's other processes (thousands under load) after
        # its init: their sockets hold the ports a little longer than nspawn lives.
        deadline = time.monotonic() + 60
        while busy_ports() and time.monotonic() < deadline:
            time.sleep(0.2)

    def _wait_exit(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None:
                if self._proc.poll() is not None:
                    return True
            elif not is_nspawn(pid):
                return True
            time.sleep(0.2)
        return False

    def destroy(self, shutdown_timeout: float = 60) -> None:
        """Stop the container and remove its files (nothing to do if already done)."""
        if self.nspawn_pid is None and not self.root.exists():
            return
        started = time.monotonic()
        self.shutdown(shutdown_timeout)
        stopped = time.monotonic()
        if self.mail_fs.is_mount():
            run_host(["umount", str(self.mail_fs)])
        with contextlib.suppress(FileNotFoundError):
            self.mail_fs.rmdir()
        self._mail_image.unlink(missing_ok=True)
        remove_tree(self.root)
        if self.pidfile:
            self.pidfile.unlink(missing_ok=True)
        log(
            f"container {self.name}: stopped in {stopped - started:.1f} s, "
            f"removed in {time.monotonic() - stopped:.1f} s"
        )
        with contextlib.suppress(FileNotFoundError):
            self.log_path.unlink()

    # commands inside

    def command(self, cmd: list[str] | str) -> list[str]:
        if self.init_pid is None:
            raise RelayError("container is not running")
        if isinstance(cmd, str):
            cmd = ["/bin/sh", "-c", cmd]
        env = [f"{k}={v}" for k, v in CONTAINER_ENV.items()]
        return ["nsenter", "-t", str(self.init_pid), "-a", "env", "-i", *env, *cmd]

    def run(
        self,
        cmd: list[str] | str,
        check: bool = True,
        timeout: float = 300,
        input: str | bytes | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess:
        """Run a command inside the container (a string goes through /bin/sh -c)."""
        res = subprocess.run(
            self.command(cmd),
            input=input,
            capture_output=True,
            text=text,
            timeout=timeout,
            check=False,
        )
        if check and res.returncode != 0:
            shown = cmd if isinstance(cmd, str) else shlex.join(cmd)
            raise RelayError(
                f"in container: {shown} exited {res.returncode}\n"
                f"stdout: {res.stdout[-3000:]}\nstderr: {res.stderr[-3000:]}"
            )
        return res

    def write_file(self, path: str, content: str, mode: str = "0644") -> None:
        self.run(
            f"mkdir -p {shlex.quote(os.path.dirname(path))} && "
            f"cat > {shlex.quote(path)} && chmod {mode} {shlex.quote(path)}",
            input=content,
        )

    def read_file(self, path: str) -> str:
        return self.run(["cat", path]).stdout

    def provide_dovecot_packages(self, repo: Path) -> None:
        """Serve a patched Dovecot build (``dovecotbuild.ensure_built``) to the minion as
        salt://dovecot-packages/<suite>: copied into the container's file tree, so a
        running container can switch to it (apply with dovecot:packages patched)."""
        dest = self.root / PACKAGES_ROOT.lstrip("/") / "dovecot-packages" / self.suite
        if dest.exists():
            remove_tree(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(repo, dest)

    # salt

    def configure_salt(self, pillar: dict) -> None:
        """Masterless minion: the formula from the bind-mounted repository, our pillar."""
        roots = list(FILE_ROOTS)
        if (self.root / PACKAGES_ROOT.lstrip("/")).is_dir():
            roots.append(PACKAGES_ROOT)
        minion = {
            "file_client": "local",
            "file_roots": {"base": roots},
            "pillar_roots": {"base": ["/srv/pillar"]},
            "state_output": "changes",
        }
        # JSON is YAML: no YAML library needed on the host.
        self.write_file("/etc/salt/minion.d/chatmail-test.conf", json.dumps(minion, indent=2))
        self.write_file("/srv/pillar/top.sls", json.dumps({"base": {"*": ["chatmail"]}}))
        self.write_file("/srv/pillar/chatmail.sls", json.dumps(pillar, indent=2), mode="0600")

    def salt_call(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        return self.run(
            ["salt-call", "--local", "--log-level=warning", *args], check=False, timeout=timeout
        )

    def apply(self, state: str = "chatmail", timeout: float = 1800) -> ApplyResult:
        started = time.monotonic()
        res = self.salt_call(
            "--out=json", "--retcode-passthrough", "state.apply", state, timeout=timeout
        )
        result = ApplyResult(res.returncode, time.monotonic() - started, raw=res.stdout)
        try:
            local = json.loads(res.stdout)["local"]
        except (ValueError, KeyError, TypeError):
            result.errors = [f"unparsable salt output: {res.stdout[-2000:]} {res.stderr[-2000:]}"]
            return result
        if isinstance(local, dict):
            result.states = local
        else:
            result.errors = [str(e) for e in (local if isinstance(local, list) else [local])]
        return result

    def wait_for_port(self, port: int, host: str = "127.0.0.1", timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection((host, port), timeout=2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RelayError(f"nothing listens on {host}:{port} after {timeout:.0f} s")
                time.sleep(0.3)

    def wait_for_services(self, timeout: float = 90) -> None:
        for port in PUBLIC_PORTS:
            self.wait_for_port(port, timeout=timeout)


def _read_status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def is_nspawn(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "systemd-nspawn"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _container_init(nspawn_pid: int) -> int | None:
    """The host PID of the process that is PID 1 in the container nspawn started."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        status = _read_status(int(entry.name))
        nspid = status.get("NSpid", "").split()
        if len(nspid) < 2 or nspid[-1] != "1":
            continue
        ancestor = int(status.get("PPid", "0"))
        for _ in range(5):
            if ancestor == nspawn_pid:
                return int(entry.name)
            if ancestor <= 1:
                break
            ancestor = int(_read_status(ancestor).get("PPid", "0") or 0)
    return None


# --- pillar for a local _-domain relay ------------------------------------------------------


def local_relay_pillar(
    domain: str = DEFAULT_DOMAIN, mta: str = "postfix", **settings: object
) -> dict:
    """Pillar for a self-signed relay on a made-up ``_`` domain inside a container."""
    pillar: dict = {
        "mail_domain": domain,
        "mta": mta,
        "tls": {"mode": "self"},
        "dns_forwarder": host_nameserver(),
        # The container has no IPv6 route on this kind of host.
        "ipv6": False,
        "settings": {
            # A shared 2-core test host is often busy: never refuse accounts for load.
            "max_load_1m": 1000,
            "min_available_memory": "0",
            "min_free_disk_space": "0",
            "max_user_send_per_minute": 600,
            "max_user_send_burst_size": 100,
            **settings,
        },
    }
    return {"chatmail": pillar}


# --- the persistent relay of `scripts/deploy` ---------------------------------------------


def persistent_relay() -> tuple[Relay, dict]:
    relay = Relay(PERSISTENT_ROOT)
    state = {}
    if PERSISTENT_STATE.exists():
        state = json.loads(PERSISTENT_STATE.read_text())
        pid = state.get("nspawn_pid")
        if pid and is_nspawn(pid) and _container_init(pid):
            relay.attach(pid)
    return relay, state


def cmd_up(args: argparse.Namespace) -> int:
    relay, state = persistent_relay()
    domain = state.get("domain", args.domain)
    if relay.is_running():
        log(
            f"relay container already running ({PERSISTENT_ROOT}): re-applying the formula "
            "(`scripts/deploy --destroy` removes it)"
        )
    else:
        if PERSISTENT_ROOT.exists():
            log(
                f"existing relay container in {PERSISTENT_ROOT}: booting it and re-applying "
                "(`scripts/deploy --destroy` removes it)"
            )
        else:
            relay.unpack()
        relay.boot()
        state = {"domain": domain, "nspawn_pid": relay.nspawn_pid}
        PERSISTENT_STATE.write_text(json.dumps(state))
    pillar = local_relay_pillar(domain)
    if args.dovecot == "patched":
        import dovecotbuild  # imports this module: only when needed

        relay.provide_dovecot_packages(dovecotbuild.ensure_built(relay.suite))
    pillar["chatmail"]["dovecot"] = {"packages": args.dovecot}
    relay.configure_salt(pillar)
    log("applying the chatmail formula (first run installs packages: a few minutes)")
    result = relay.apply()
    print(result.summary(), file=sys.stderr)
    if not result.ok:
        log("the relay container stays up for inspection: scripts/deploy --shell")
        return 1
    relay.wait_for_services()
    print_access(relay, domain)
    return 0


def print_access(relay: Relay, domain: str) -> None:
    account = ""
    res = (
        subprocess.run(
            [
                "curl",
                "-sk",
                "-X",
                "POST",
                "--resolve",
                f"{domain}:443:127.0.0.1",
                f"https://{domain}/new",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if shutil.which("curl")
        else None
    )
    if res is not None and res.returncode == 0:
        try:
            creds = json.loads(res.stdout)
            account = (
                f"dclogin:{creds['email']}?p={urllib.parse.quote(creds['password'], safe='')}"
                "&v=1&ih=127.0.0.1&ip=993&is=ssl&sh=127.0.0.1&sp=465&ss=ssl&ic=3"
            )
        except (ValueError, KeyError):
            account = ""
    print(f"""
chatmail relay for {domain} is running in a systemd-nspawn container ({PERSISTENT_ROOT}).
It shares this host's network: IMAP 993/143, SMTP 25/465/587, HTTPS 443, HTTP 80.

  web page:        https://127.0.0.1/   (self-signed certificate)
  new account:     curl -k -X POST https://127.0.0.1/new
  shell inside:    scripts/deploy --shell
  re-apply:        scripts/deploy
  remove it:       scripts/deploy --destroy
""")
    if account:
        print(f"  first account (Delta Chat: 'scan QR' or paste):\n  {account}\n")
        qr = relay.run(
            [
                "/usr/local/lib/chatmaild/venv/bin/python",
                "-c",
                (
                    "import sys, qrcode; q = qrcode.QRCode(border=1); q.add_data(sys.argv[1]); "
                    "q.print_ascii(invert=True)"
                ),
                account,
            ],
            check=False,
        )
        if qr.returncode == 0:
            print(qr.stdout)
    else:
        print(
            "  (could not create a first account via POST /new: "
            f"{(res.stderr or res.stdout)[:300] if res else 'curl missing'})"
        )


def cmd_destroy(args: argparse.Namespace) -> int:
    relay, _ = persistent_relay()
    if not PERSISTENT_ROOT.exists() and not relay.is_running():
        log("no relay container to remove")
        return 0
    relay.destroy()
    with contextlib.suppress(FileNotFoundError):
        PERSISTENT_STATE.unlink()
    log(f"removed {PERSISTENT_ROOT}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    relay, state = persistent_relay()
    if not relay.is_running():
        print(
            "not running"
            + (f" (root {PERSISTENT_ROOT} exists)" if PERSISTENT_ROOT.exists() else "")
        )
        return 1
    print(f"running: {state.get('domain')} nspawn pid {relay.nspawn_pid}")
    print(
        relay.run("systemctl --no-pager --failed; systemctl is-system-running", check=False).stdout
    )
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    relay, _ = persistent_relay()
    if not relay.is_running():
        log("the relay container is not running (scripts/deploy starts it)")
        return 1
    cmd = args.cmd or ["/bin/bash", "-l"]
    return subprocess.call(relay.command(cmd))


def cmd_build(args: argparse.Namespace) -> int:
    print(ensure_rootfs(args.suite))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relayctl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="boot (or re-apply) the persistent local relay container")
    up.add_argument("--domain", default=DEFAULT_DOMAIN)
    up.add_argument(
        "--dovecot",
        choices=("debian", "patched"),
        default="debian",
        help="Debian's Dovecot, or ours without the IDLE delay (built first: scripts/build-dovecot)",
    )
    up.set_defaults(func=cmd_up)
    sub.add_parser("destroy", help="stop and remove it").set_defaults(func=cmd_destroy)
    sub.add_parser("status", help="is it running").set_defaults(func=cmd_status)
    shell = sub.add_parser("shell", help="run a shell (or a command) inside it")
    shell.add_argument("cmd", nargs=argparse.REMAINDER)
    shell.set_defaults(func=cmd_shell)
    build = sub.add_parser("build", help="build the cached base rootfs")
    build.add_argument("--suite", default=DEFAULT_SUITE, help="Debian release (bookworm, trixie)")
    build.set_defaults(func=cmd_build)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except RelayError as exc:
        log(f"error: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
