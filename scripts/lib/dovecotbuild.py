"""Build Debian's Dovecot with our patches into a local apt repository, cached per machine.

The recipe: Debian's own source package (the version and .dsc sha256 pinned per suite in
``packaging/dovecot/sources``, downloaded from the archive's pool), our patches from
``packaging/dovecot/debian/patches`` appended to its ``debian/patches/series``, a changelog
entry that marks the version as ours (``+chatmail1``), then ``dpkg-buildpackage -b``
(``nocheck``, parallel) inside a throw-away container of the suite's cached base root
filesystem (``relayctl.ensure_rootfs``). The result is a flat apt repository (the .debs and
a ``Packages`` index) under ``/var/cache/chatmail-test/dovecot-debs/<suite>/<key>/``; the key
hashes everything that goes in, so a cached build is reused in milliseconds and any change to
the patches or the pinned source builds anew.

CLI: ``python3 scripts/lib/dovecotbuild.py [--suite bookworm|trixie ...]`` prints the
repository directories (``scripts/build-dovecot``).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import relayctl

PACKAGING = relayctl.REPO_ROOT / "packaging/dovecot"
PATCHES = PACKAGING / "debian/patches"
OUTPUT_DIR = relayctl.CACHE_DIR / "dovecot-debs"
#: Where each archive keeps Dovecot's source (packaging/dovecot/sources names the archive).
POOLS = {
    "debian": f"{relayctl.MIRROR}/pool/main/d/dovecot",
    "debian-security": "http://deb.debian.org/debian-security/pool/updates/main/d/dovecot",
}
#: Our mark on the version: sorts above Debian's same revision, and the relay pins on it.
VERSION_SUFFIX = "+chatmail1"
#: Bump when the recipe below changes in a way the hash inputs do not capture.
RECIPE_VERSION = "1"
BUILD_TOOLS = "build-essential fakeroot dpkg-dev"
#: Debian's rules build with link-time optimization, which re-optimizes Dovecot's static
#: libraries at every link of its ~200 programs and test programs: on 2 busy cores that
#: build had done a quarter of the tree after 18 minutes. The user flags go after the
#: package's, so -fno-lto wins; the code compiled is the same.
BUILD_ENV = "DEB_CFLAGS_APPEND=-fno-lto DEB_CXXFLAGS_APPEND=-fno-lto DEB_LDFLAGS_APPEND=-fno-lto"


class BuildError(RuntimeError):
    """The patched Dovecot could not be built."""


def pinned_sources(path: Path = PACKAGING / "sources") -> dict[str, tuple[str, str, str]]:
    """suite -> (Debian version, sha256 of its .dsc, archive)."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (3, 4) or (fields[3:] or ["debian"])[0] not in POOLS:
            raise BuildError(f"{path}:{number}: expected: suite version sha256 [{'|'.join(POOLS)}]")
        suite, version, dsc_sha256, *archive = fields
        pins[suite] = (version, dsc_sha256, archive[0] if archive else "debian")
    return pins


def patch_files() -> list[Path]:
    series = (PATCHES / "series").read_text().split()
    return [PATCHES / name for name in series]


def build_key(suite: str, version: str, dsc_sha256: str) -> str:
    digest = hashlib.sha256()
    for part in (
        RECIPE_VERSION,
        suite,
        version,
        dsc_sha256,
        VERSION_SUFFIX,
        BUILD_TOOLS,
        BUILD_ENV,
    ):
        digest.update(part.encode() + b"\0")
    for patch in patch_files():
        digest.update(patch.name.encode() + b"\0" + patch.read_bytes())
    return digest.hexdigest()[:16]


def repo_dir(suite: str) -> Path:
    """Where the suite's build lands (it may not exist yet)."""
    pins = pinned_sources()
    if suite not in pins:
        raise BuildError(f"no pinned Dovecot source for {suite!r} in {PACKAGING / 'sources'}")
    version, dsc_sha256, _ = pins[suite]
    upstream_revision = version.split(":", 1)[-1]
    return OUTPUT_DIR / suite / f"{upstream_revision}-{build_key(suite, version, dsc_sha256)}"


def is_built(suite: str) -> bool:
    return (repo_dir(suite) / "Packages").exists()


def ensure_built(suite: str, jobs: int = 0) -> Path:
    """The suite's patched package repository, built first unless cached."""
    out = repo_dir(suite)
    if (out / "Packages").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session may be building the same one
        if not (out / "Packages").exists():
            build(suite, out, jobs or os.cpu_count() or 1)
    return out


def download(url: str, dest: Path) -> None:
    with urllib.request.urlopen(url, timeout=120) as response, open(dest, "wb") as file:
        shutil.copyfileobj(response, file)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_source(version: str, dsc_sha256: str, archive: str, dest: Path) -> str:
    """Download the .dsc (checked against the pin) and every file it lists (checked
    against the .dsc); returns the .dsc's file name."""
    dsc_name = f"dovecot_{version.split(':', 1)[-1]}.dsc"
    names = [dsc_name]
    for name in names:
        path = dest / name
        download(f"{POOLS[archive]}/{urllib.parse.quote(name)}", path)
        if name == dsc_name:
            if sha256_of(path) != dsc_sha256:
                raise BuildError(
                    f"{name}: sha256 differs from the pin in packaging/dovecot/sources"
                )
            listed = re.search(r"^Checksums-Sha256:\n((?: .*\n)+)", path.read_text(), re.MULTILINE)
            if not listed:
                raise BuildError(f"{name} lists no Checksums-Sha256")
            expected = {line.split()[2]: line.split()[0] for line in listed.group(1).splitlines()}
            names += list(expected)
        elif sha256_of(path) != expected[name]:
            raise BuildError(f"{name}: sha256 differs from {dsc_name}")
    return dsc_name


def changelog_entry(version: str, suite: str, top_entry_trailer: str) -> str:
    """Our changelog entry, dated like Debian's (the build stays reproducible)."""
    patches = ", ".join(p.name for p in patch_files())
    return (
        f"dovecot ({version}{VERSION_SUFFIX}) {suite}; urgency=medium\n\n"
        f"  * chatmail relay build: {patches}\n\n"
        f" -- chatmail relay formula <root@localhost>  {top_entry_trailer}\n\n"
    )


def build(suite: str, out: Path, jobs: int) -> None:
    version, dsc_sha256, archive = pinned_sources()[suite]
    started = time.monotonic()
    stage = OUTPUT_DIR / f"build-{suite}"
    relayctl.remove_tree(stage)
    stage.mkdir(parents=True)
    tarball = relayctl.ensure_rootfs(suite)
    relayctl.log(f"building patched Dovecot {version}{VERSION_SUFFIX} for {suite} (-j{jobs})")
    relayctl.run_host(
        [
            "tar",
            "-C",
            str(stage),
            "--numeric-owner",
            "--xattrs",
            "-I",
            "zstd -T0",
            "-xpf",
            str(tarball),
        ]
    )
    src = stage / "build"
    src.mkdir()
    dsc_name = fetch_source(version, dsc_sha256, archive, src)
    (src / "patches").mkdir()
    for patch in patch_files():
        shutil.copy(patch, src / "patches" / patch.name)
    (src / "series").write_text("".join(p.name + "\n" for p in patch_files()))
    (src / "entry-head").write_text(changelog_entry(version, suite, "@DATE@"))
    apt_archives = OUTPUT_DIR / f"apt-archives-{suite}"  # not the relays' one: its lock
    (apt_archives / "partial").mkdir(parents=True, exist_ok=True)
    script = f"""set -eu
export DEBIAN_FRONTEND=noninteractive
cd /build
apt-get -q update >/dev/null
apt-get -qy install --no-install-recommends {BUILD_TOOLS} >/dev/null
dpkg-source -x {dsc_name} tree >/dev/null
cp patches/* tree/debian/patches/
cat series >> tree/debian/patches/series
date=$(sed -n '0,/^ -- /s/^ -- .*>  //p' tree/debian/changelog)
sed "s/@DATE@/$date/" entry-head | cat - tree/debian/changelog > changelog.new
mv changelog.new tree/debian/changelog
apt-get -qy build-dep --no-install-recommends ./tree >/dev/null
cd tree
{BUILD_ENV} DEB_BUILD_OPTIONS="nocheck noddebs parallel={jobs}" dpkg-buildpackage -b -us -uc >../build.log 2>&1 \\
    || {{ tail -60 ../build.log; exit 1; }}
cd ..
mkdir repo && mv *.deb repo/
cd repo && dpkg-scanpackages --multiversion . > Packages 2>/dev/null
"""
    relayctl.run_host(
        relayctl.nspawn_base(stage)
        + ["--pipe", f"--bind={apt_archives}:/var/cache/apt/archives", "/bin/sh", "-c", script]
    )
    partial = out.with_name(out.name + ".partial")
    relayctl.remove_tree(partial)
    shutil.move(src / "repo", partial)
    partial.rename(out)
    relayctl.remove_tree(stage)
    for old in out.parent.iterdir():
        if old.is_dir() and old != out:
            relayctl.remove_tree(old)
    relayctl.log(f"patched Dovecot for {suite} built in {time.monotonic() - started:.0f} s: {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build-dovecot", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite", action="append", choices=sorted(pinned_sources()), help="default: all"
    )
    parser.add_argument("--jobs", type=int, default=0, help="parallel jobs (default: all cores)")
    parser.add_argument(
        "--check", action="store_true", help="only say whether the build is cached (exit 1: not)"
    )
    args = parser.parse_args(argv)
    suites = args.suite or sorted(pinned_sources())
    try:
        if args.check:
            missing = [s for s in suites if not is_built(s)]
            for suite in suites:
                print(
                    f"{suite}: {'cached' if suite not in missing else 'not built'} {repo_dir(suite)}"
                )
            return 1 if missing else 0
        with relayctl.sigterm_as_interrupt():
            for suite in suites:
                print(ensure_built(suite, args.jobs))
    except (BuildError, relayctl.RelayError, subprocess.CalledProcessError, OSError) as exc:
        relayctl.log(f"error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
