"""Reading the end of an agent's log file, size-capped, for `fleetwire agent logs`."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TAIL_LINES = 100
MAX_TAIL_LINES = 10_000
# Never more than this much of a log in one answer.
MAX_TAIL_BYTES = 256 * 1024


def read_tail(path: Path, lines: int) -> tuple[str, bool]:
    """The last `lines` lines of path (at most MAX_TAIL_BYTES); and whether anything
    older was left out."""
    lines = min(lines or DEFAULT_TAIL_LINES, MAX_TAIL_LINES)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - MAX_TAIL_BYTES)
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return "", False
    text = data.decode("utf-8", errors="replace")
    if start > 0:
        text = text.split("\n", 1)[1] if "\n" in text else ""  # drop a partial first line
    kept = text.splitlines(keepends=True)
    return "".join(kept[-lines:]), start > 0 or len(kept) > lines
