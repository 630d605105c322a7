"""What OpenSMTPD's two line protocols share.

Table backends (smtpd-tables(7), :mod:`chatmaild.smtpdtable`) and filters
(smtpd-filters(7), :mod:`chatmaild.smtpdfilter`) are both told smtpd's settings first, one
``config|<key>|<value>`` line each, ended by ``config|ready``; only then do they register.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigEntry:
    """``config|<key>|<value>``; ``config|ready`` has key ``ready`` and value None."""

    key: str
    value: str | None


def parse_config_line(line: str) -> ConfigEntry | None:
    """A ``config|...`` line; None if it is malformed (the caller says how it reports that)."""
    fields = line.split("|", 2)
    if fields[0] != "config":
        return None
    if fields[1:] == ["ready"]:
        return ConfigEntry("ready", None)
    if len(fields) != 3 or not fields[1]:
        return None
    return ConfigEntry(fields[1], fields[2])
