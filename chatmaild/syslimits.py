"""System limits that pause account creation when the relay is short of resources.

Only *new* accounts are refused: existing accounts keep logging in however loaded the
host is. Readings use the standard library only (``os.getloadavg``, ``/proc/meminfo`` or
``sysconf``, ``shutil.disk_usage``). A value that cannot be read is logged as
``ignoring unreadable system limit`` and that one check is skipped, so a broken probe
never blocks every registration.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import Config

log = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class SystemReadings:
    """One sample of the host; None marks a value that could not be read."""

    load_1m: float | None
    available_memory_mb: int | None
    free_disk_mb: int | None


def _read_load_1m() -> float:
    return os.getloadavg()[0]


def _read_available_memory_mb(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        text = meminfo.read_text()
    except FileNotFoundError:
        # Not Linux (OpenBSD has no /proc): free pages are a pessimistic stand-in.
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // MIB
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024  # the kernel reports kB
    raise ValueError("no MemAvailable line in /proc/meminfo")


def _read_free_disk_mb(path: Path) -> int:
    return shutil.disk_usage(path).free // MIB


def _probe(name: str, read, *args):
    try:
        return read(*args)
    except (OSError, ValueError, AttributeError, IndexError) as exc:
        log.warning("ignoring unreadable system limit %s: %s", name, exc)
        return None


def read_system(mailboxes_path: Path) -> SystemReadings:
    """Sample load, memory and the free space of the filesystem holding the mailboxes."""
    return SystemReadings(
        load_1m=_probe("load_1m", _read_load_1m),
        available_memory_mb=_probe("available_memory", _read_available_memory_mb),
        free_disk_mb=_probe("free_disk_space", _read_free_disk_mb, mailboxes_path),
    )


def exceeded_limit(config: Config, readings: SystemReadings) -> tuple[str, str] | None:
    """``(reason, detail)`` for the first limit the readings exceed, else None.

    ``reason`` is the counter label: ``load``, ``memory`` or ``disk``.
    """
    if readings.load_1m is not None and readings.load_1m > config.max_load_1m:
        return "load", f"1-minute load {readings.load_1m:.2f} > max_load_1m {config.max_load_1m}"
    memory = readings.available_memory_mb
    if memory is not None and memory < config.min_available_memory_mb:
        return "memory", (
            f"available memory {memory} MB < min_available_memory {config.min_available_memory}"
        )
    disk = readings.free_disk_mb
    if disk is not None and disk < config.min_free_disk_space_mb:
        return (
            "disk",
            f"free disk space {disk} MB < min_free_disk_space {config.min_free_disk_space}",
        )
    return None
