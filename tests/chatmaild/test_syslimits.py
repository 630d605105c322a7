"""System limits: each one refuses new accounts, unreadable values are skipped."""

from __future__ import annotations

import logging

import pytest

from chatmaild import syslimits
from chatmaild.accounts import get_or_create
from chatmaild.syslimits import SystemReadings, exceeded_limit, read_system

LIMITS = {"max_load_1m": 2.0, "min_available_memory": "200M", "min_free_disk_space": "1G"}


@pytest.mark.parametrize(
    ("readings", "reason"),
    [
        (SystemReadings(1.0, 500, 2000), None),
        (SystemReadings(2.0, 200, 1024), None),
        (SystemReadings(2.01, 500, 2000), "load"),
        (SystemReadings(1.0, 199, 2000), "memory"),
        (SystemReadings(1.0, 500, 1023), "disk"),
        (SystemReadings(9.0, 1, 1), "load"),
        (SystemReadings(None, None, None), None),
        (SystemReadings(None, 100, None), "memory"),
        (SystemReadings(3.0, None, None), "load"),
        (SystemReadings(None, None, 5), "disk"),
    ],
    ids=[
        "idle",
        "exactly-at-limits",
        "load",
        "memory",
        "disk",
        "all-exceeded-load-first",
        "all-unreadable",
        "unreadable-load-memory-still-checked",
        "unreadable-memory-load-checked",
        "only-disk-readable",
    ],
)
def test_exceeded_limit(make_config, readings, reason):
    config = make_config("chat.example.org", **LIMITS)
    exceeded = exceeded_limit(config, readings)
    assert (exceeded[0] if exceeded else None) == reason


@pytest.mark.parametrize(
    ("readings", "needle"),
    [
        (
            SystemReadings(7.5, 500, 2000),
            "registration rejected: load (1-minute load 7.50 > max_load_1m 2.0)",
        ),
        (SystemReadings(1.0, 10, 2000), "registration rejected: memory"),
        (SystemReadings(1.0, 500, 10), "registration rejected: disk"),
    ],
    ids=["load", "memory", "disk"],
)
def test_rejection_is_logged(make_config, caplog, readings, needle):
    config = make_config("chat.example.org", **LIMITS)
    with caplog.at_level(logging.WARNING):
        account = get_or_create(config, "abcdefghi@chat.example.org", "password123", None, readings)
    assert account.password_hash is None
    assert needle in caplog.text


def test_sufficient_resources_log_nothing(make_config, caplog):
    config = make_config("chat.example.org", **LIMITS)
    with caplog.at_level(logging.WARNING):
        readings = SystemReadings(0.5, 1000, 5000)
        account = get_or_create(config, "abcdefghi@chat.example.org", "password123", None, readings)
    assert account.created
    assert caplog.text == ""


def test_reads_this_host(tmp_path):
    readings = read_system(tmp_path)
    assert readings.load_1m is not None and readings.load_1m >= 0
    assert readings.available_memory_mb is not None and readings.available_memory_mb > 0
    assert readings.free_disk_mb is not None and readings.free_disk_mb >= 0


def test_unreadable_disk_is_ignored(make_config, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        readings = read_system(tmp_path / "does-not-exist")
    assert readings.free_disk_mb is None
    assert "ignoring unreadable system limit free_disk_space" in caplog.text
    config = make_config(
        "chat.example.org",
        max_load_1m=99999,
        min_available_memory="0",
        mailboxes_dir=tmp_path / "does-not-exist",
    )
    assert exceeded_limit(config, readings) is None


def test_real_limits_no_host_meets(make_config, tmp_path):
    config = make_config("chat.example.org", max_load_1m=99999, min_available_memory="100T")
    assert exceeded_limit(config, read_system(config.mailboxes_path))[0] == "memory"


@pytest.mark.parametrize(
    ("meminfo", "expected"),
    [
        ("MemTotal:       16000000 kB\nMemFree:  100 kB\nMemAvailable:    2048000 kB\n", 2000),
        ("MemTotal: 1 kB\nMemAvailable: 1023 kB\n", 0),
    ],
    ids=["typical", "below-one-mb"],
)
def test_meminfo_parsing(tmp_path, meminfo, expected):
    path = tmp_path / "meminfo"
    path.write_text(meminfo)
    assert syslimits._read_available_memory_mb(path) == expected


def test_meminfo_without_available_line_is_unreadable(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text("MemTotal: 1 kB\n")
    with pytest.raises(ValueError):
        syslimits._read_available_memory_mb(path)
