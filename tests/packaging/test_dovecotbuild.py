"""scripts/lib/dovecotbuild.py without building: the pinned sources, the cache key and our
changelog entry. The build itself runs in tests/e2e/test_dovecot_packages.py."""

from __future__ import annotations

import re
import shutil

import dovecotbuild
import pytest


def test_every_release_the_relays_run_is_pinned():
    pins = dovecotbuild.pinned_sources()
    assert set(pins) == {"bookworm", "trixie"}
    for version, dsc_sha256, archive in pins.values():
        assert re.fullmatch(r"1:2\.[34]\.\d+(\.\d+)?\+dfsg1-[\w.+]+", version), version
        assert re.fullmatch(r"[0-9a-f]{64}", dsc_sha256)
        assert archive in dovecotbuild.POOLS


@pytest.mark.parametrize(
    "line",
    ["bookworm 1:2.3.19.1+dfsg1-2.1", "bookworm 1:2.3 abc elsewhere", "a b c d e"],
    ids=["no-sha256", "unknown-archive", "too-many-fields"],
)
def test_a_malformed_pin_names_its_line(tmp_path, line):
    sources = tmp_path / "sources"
    sources.write_text(f"# comment\n\n{line}\n")
    with pytest.raises(dovecotbuild.BuildError, match=rf"{sources}:3: expected"):
        dovecotbuild.pinned_sources(sources)


def test_a_changed_patch_is_a_new_build(tmp_path, monkeypatch):
    before = dovecotbuild.repo_dir("bookworm")
    assert before.parent == dovecotbuild.OUTPUT_DIR / "bookworm"
    assert before.name.startswith("2.3.19.1+dfsg1-")
    patches = tmp_path / "patches"
    shutil.copytree(dovecotbuild.PATCHES, patches)
    monkeypatch.setattr(dovecotbuild, "PATCHES", patches)
    assert dovecotbuild.repo_dir("bookworm") == before
    patch = patches / (patches / "series").read_text().split()[0]
    patch.write_text(patch.read_text() + "\n")
    assert dovecotbuild.repo_dir("bookworm") != before
    assert dovecotbuild.repo_dir("trixie").parent.name == "trixie"


def test_changelog_entry_marks_the_version_as_ours():
    date = "Fri, 29 May 2026 21:24:28 +0200"
    entry = dovecotbuild.changelog_entry("1:2.4.1+dfsg1-6+deb13u6", "trixie", date)
    head, *_, trailer = entry.strip().splitlines()
    assert head == "dovecot (1:2.4.1+dfsg1-6+deb13u6+chatmail1) trixie; urgency=medium"
    assert "chatmail-notify-without-delay.patch" in entry
    # dpkg-parsechangelog's format: " -- name <email>  date" (two spaces)
    assert re.fullmatch(rf" -- .+ <.+>  {re.escape(date)}", trailer)
