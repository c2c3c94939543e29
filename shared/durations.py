"""Durations as people type them: 90s, 15m, 24h, 2d (a bare number is seconds)."""

from __future__ import annotations

import re

from shared.errors import InvalidArgument

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str, what: str) -> float:
    """Seconds in `text`; InvalidArgument naming `what` if it is not a duration."""
    found = _RE.match(text)
    if not found:
        raise InvalidArgument(
            f"{what} '{text}' is not a duration; write it like 90s, 15m, 24h or 2d")
    return float(found[1]) * _UNITS[found[2] or "s"]


def describe(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
