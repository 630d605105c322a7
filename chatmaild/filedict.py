"""A small JSON dict on disk, shared by concurrent writers.

Writers hold ``<path>.lock`` for the whole read-modify-write and replace the file
atomically, so concurrent updates never lose each other's changes and readers (who take no
lock) see either the old or the new content. A corrupt file is logged and read as ``{}``:
losing push tokens is better than a daemon that fails every request for that account.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import filelock

from .fileio import write_text_atomic

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 10


class FileDict:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")

    def read(self) -> dict:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("corrupt serialization state at %s: %s", self.path, exc)
            return {}
        try:
            data = json.loads(text)
        except ValueError as exc:
            log.warning("corrupt serialization state at %s: %s", self.path, exc)
            return {}
        if not isinstance(data, dict):
            log.warning("corrupt serialization state at %s: not a JSON object", self.path)
            return {}
        return data

    @contextlib.contextmanager
    def modify(self) -> Iterator[dict]:
        """Yield the current dict; what the block leaves in it is written back atomically.

        An exception inside the block leaves the file unchanged.
        """
        with filelock.FileLock(str(self.lock_path), timeout=LOCK_TIMEOUT_S):
            data = self.read()
            yield data
            write_text_atomic(self.path, json.dumps(data, sort_keys=True))
