"""Another connection holding a SQLite database, another process rebuilding its WAL
index, and a ticker that shows the event loop kept running meanwhile (for the tests of
what waits where)."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any


def hold(path: Path, begin: str, held: threading.Event, release: threading.Event,
         holding: str) -> None:
    """In a thread: another process's connection holding a transaction (begun with
    begin, then running holding) until released."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute(begin)
        other.execute(holding).fetchall()
        held.set()
        release.wait(30)
        other.execute("COMMIT")
    finally:
        other.close()


async def ticks_while(work: Any) -> tuple[Any, int]:
    """Run work; count how often a 10 ms ticker ran meanwhile (the loop kept going)."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        return await work, ticks
    finally:
        ticker.cancel()


# A process in the middle of rebuilding a WAL database's index (the "-shm" file), as
# SQLite's own locks show it (os_unix.c, wal.c):
# - like every connection to a WAL database, a shared lock on the database file (510
#   bytes from SHARED_FIRST), so that no other connection closing deletes the WAL files;
# - a share of the index's "open" lock (UNIX_SHM_DMS, byte 128 of the -shm file), so a
#   newcomer does not start the index afresh;
# - the index's writer and recovery locks (bytes 120 and 122), and the index is blank.
_REBUILDING = """
import fcntl, os, sys
db = os.open(sys.argv[1], os.O_RDWR)
fcntl.lockf(db, fcntl.LOCK_SH, 510, 0x40000002)
fd = os.open(sys.argv[1] + "-shm", os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 32768)
fcntl.lockf(fd, fcntl.LOCK_SH, 1, 128)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, 120)
fcntl.lockf(fd, fcntl.LOCK_EX, 1, 122)
print("held", flush=True)
sys.stdin.read()
"""


@contextlib.asynccontextmanager
async def rebuilding_wal_index(path: Path) -> AsyncIterator[Callable[[], None]]:
    """Another process rebuilding the WAL index of the database at path (no connection
    of this process may have it open) until the function yielded is called. A
    connection that opens the database meanwhile gets SQLITE_BUSY_RECOVERY."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _REBUILDING, str(path),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), 10) == b"held\n"
        yield proc.stdin.close  # it exits at the end of its input, and its locks go
    finally:
        proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
