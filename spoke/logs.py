"""Agent logs: written by the agent's supervisor under a size cap, read for `agent logs`.

The agent writes to a pipe whose read end its supervisor holds; the agent never has the
log file open. At the cap, the newest output is kept: the log is two files, LOG and
LOG.1, each at most half the cap. When LOG is full it becomes LOG.1 (the previous LOG.1
is dropped) and a new LOG begins. Together they never exceed the cap.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

DEFAULT_TAIL_LINES = 100
MAX_TAIL_LINES = 10_000
# Never more than this much of a log in one answer.
MAX_TAIL_BYTES = 256 * 1024
ROTATED_SUFFIX = ".1"
# Written at the top of each new LOG once a rotation has dropped older output.
ROTATION_NOTE = b"[fleetwire: older output was dropped at the log's size cap]\n"


def rotated(path: Path) -> Path:
    return path.with_name(path.name + ROTATED_SUFFIX)


class LogWriter:
    """Appends an agent's output to its log, keeping LOG and LOG.1 each at most half of
    cap_bytes (0: no cap)."""

    def __init__(self, path: Path, cap_bytes: int) -> None:
        self._path = path
        self._half = max(cap_bytes // 2, len(ROTATION_NOTE) + 1) if cap_bytes else 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                           0o600)
        self._size = os.fstat(self._fd).st_size

    def write(self, data: bytes) -> None:
        while data:
            take = len(data)
            if self._half and take > self._half - self._size:
                # Rotate at a line's end: both files then hold whole lines, unless one
                # line is longer than a file may be.
                take = data.rfind(b"\n", 0, max(self._half - self._size, 0)) + 1
                if not take:
                    if self._size > len(ROTATION_NOTE):
                        self._rotate()
                        continue
                    take = self._half - self._size
            written = os.write(self._fd, data[:take])
            self._size += written
            data = data[written:]

    def _rotate(self) -> None:
        # LOG is never missing for a reader: LOG.1 becomes a second name of LOG's file,
        # then a new file takes the name LOG in one rename.
        fresh = self._path.with_name(self._path.name + ".new")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                     0o600)
        size = os.write(fd, ROTATION_NOTE)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(rotated(self._path))
        os.link(self._path, rotated(self._path))
        os.replace(fresh, self._path)
        os.close(self._fd)
        self._fd, self._size = fd, size

    def close(self) -> None:
        os.close(self._fd)


def read_tail(path: Path, lines: int) -> tuple[str, bool]:
    """The last `lines` lines of the log (at most MAX_TAIL_BYTES, from LOG.1 too where
    LOG has fewer); and whether anything older was left out."""
    lines = min(lines or DEFAULT_TAIL_LINES, MAX_TAIL_LINES)
    data, partial = _tail_bytes(path, MAX_TAIL_BYTES)
    older = rotated(path)
    # Whether output before what is returned exists (or existed and was dropped).
    earlier = partial or older.exists()
    if not partial and data.count(b"\n") <= lines and older.exists():
        # LOG alone is short: the rest comes from LOG.1.
        before, partial = _tail_bytes(older, MAX_TAIL_BYTES - len(data))
        data = before + data.removeprefix(ROTATION_NOTE)
        earlier = partial or data.startswith(ROTATION_NOTE)
        data = data.removeprefix(ROTATION_NOTE)
    text = data.decode("utf-8", errors="replace")
    if partial:
        text = text.split("\n", 1)[1] if "\n" in text else ""  # drop a partial first line
    kept = text.splitlines(keepends=True)
    return "".join(kept[-lines:]), earlier or len(kept) > lines


def _tail_bytes(path: Path, limit: int) -> tuple[bytes, bool]:
    """The last `limit` bytes of path, and whether there was more before them."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - limit)
            f.seek(start)
            return f.read(), start > 0
    except FileNotFoundError:
        return b"", False
