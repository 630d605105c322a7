"""Per-daemon counters that the control API exports without parsing logs.

Each daemon owns one JSON file ``<counters_dir>/<daemon>.json``, replaced atomically at
most once a second while something changed. The file survives restarts (it is loaded at
start), so Prometheus sees monotonic counters. Labels never carry addresses or users.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from .fileio import write_text_atomic

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0

LabelKey = tuple[tuple[str, str], ...]


class Counters:
    def __init__(self, directory: Path | None, daemon: str):
        self.path = Path(directory) / f"{daemon}.json" if directory else None
        self.daemon = daemon
        self._values: dict[str, dict[LabelKey, float]] = {}
        self._lock = threading.Lock()
        self._dirty = threading.Event()
        self._load()
        if self.path is not None:
            threading.Thread(target=self._flusher, name=f"{daemon}-counters", daemon=True).start()

    def inc(self, metric: str, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            series = self._values.setdefault(metric, {})
            series[key] = series.get(key, 0) + amount
        self._dirty.set()

    def value(self, metric: str, **labels: str) -> float:
        with self._lock:
            return self._values.get(metric, {}).get(tuple(sorted(labels.items())), 0)

    def snapshot(self) -> dict:
        with self._lock:
            return {
                metric: [{"labels": dict(key), "value": value} for key, value in series.items()]
                for metric, series in self._values.items()
            }

    def flush(self) -> None:
        if self.path is None:
            return
        self._dirty.clear()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps(self.snapshot(), sort_keys=True), mode=0o644)
        except OSError as exc:
            log.warning("cannot write counters to %s: %s", self.path, exc)

    def _flusher(self) -> None:
        while True:
            self._dirty.wait()
            self.flush()
            threading.Event().wait(FLUSH_INTERVAL_S)

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text())
            for metric, rows in data.items():
                for row in rows:
                    key = tuple(sorted((str(k), str(v)) for k, v in row["labels"].items()))
                    self._values.setdefault(metric, {})[key] = float(row["value"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable counters file %s: %s", self.path, exc)


def read_counters(directory: Path) -> dict[str, dict[LabelKey, float]]:
    """Sum every daemon's counters file: ``{metric: {labels: value}}`` (for the API)."""
    total: dict[str, dict[LabelKey, float]] = {}
    for path in sorted(Path(directory).glob("*.json")):
        try:
            data = json.loads(path.read_text())
            for metric, rows in data.items():
                for row in rows:
                    key = tuple(sorted((str(k), str(v)) for k, v in row["labels"].items()))
                    series = total.setdefault(metric, {})
                    series[key] = series.get(key, 0) + float(row["value"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable counters file %s: %s", path, exc)
    return total
