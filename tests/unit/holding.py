"""Another connection holding a SQLite database, and a ticker that shows the event loop
kept running meanwhile (for the tests of what waits where)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
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
