"""The SQLite adapter: statements and commits on the loop's thread unless they would
wait, a checkpoint in the connection's thread every so many commits, and the same
results, rollbacks and errors as before."""

from __future__ import annotations

import asyncio
import collections
import itertools
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiosqlite.core
import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from shared.db import sqlite_driver
from shared.db.engine import make_engine
from tests.unit.holding import hold, rebuilding_wal_index, ticks_while

# What the other connection writes while it holds the database.
_OTHER_ROW = "INSERT INTO t (name) VALUES ('other')"


@pytest.fixture
async def sqlite(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT UNIQUE)"))
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def trips(monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter[str]]:
    """How many times each function was sent to a connection's thread."""
    counted: collections.Counter[str] = collections.Counter()
    real = aiosqlite.core.Connection._execute

    async def counting(self: aiosqlite.core.Connection, fn: Any, *a: Any, **k: Any) -> Any:
        counted[getattr(fn, "__name__", repr(fn))] += 1
        return await real(self, fn, *a, **k)  # type: ignore[no-untyped-call]

    monkeypatch.setattr(aiosqlite.core.Connection, "_execute", counting)
    yield counted


async def test_nothing_that_need_not_wait_makes_a_trip(
        sqlite: AsyncEngine, tmp_path: Path, trips: collections.Counter[str]) -> None:
    async with sqlite.connect() as conn:  # the pool's connection, made before counting
        await conn.execute(text("SELECT 1"))
    trips.clear()
    async with sqlite.connect() as conn:
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 0
    assert sum(trips.values()) == 0, trips  # run on the loop's thread; nothing to end
    async with sqlite.begin() as conn:
        await conn.execute(text("INSERT INTO t (name) VALUES ('a')"))
        await conn.execute(text("INSERT INTO t (name) VALUES ('b')"))
        assert (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one() == 2
        await conn.execute(text("UPDATE t SET name = 'c' WHERE name = 'b'"))
    # Nobody else was writing: the writes and the commit ran on the loop's thread too.
    assert sum(trips.values()) == 0, trips
    # Outside a trip, a statement fails rather than waits, from the connection's start;
    # and SQLite never checkpoints inside a commit.
    fresh = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    try:
        async with fresh.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection._conn
            assert raw.execute("PRAGMA busy_timeout").fetchone() == (0,)
            assert raw.execute("PRAGMA wal_autocheckpoint").fetchone() == (0,)
    finally:
        await fresh.dispose()


async def test_every_so_many_commits_a_checkpoint_runs_in_the_thread(
        sqlite: AsyncEngine, tmp_path: Path, trips: collections.Counter[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_driver, "CHECKPOINT_EVERY", 3)
    monkeypatch.setattr(sqlite_driver, "_commits", itertools.count(1))
    async with sqlite.connect() as conn:
        await conn.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    trips.clear()

    def in_database_file() -> int:
        """Rows in the database file itself, not counting the WAL's."""
        file = sqlite3.connect(f"file:{tmp_path / 'x.db'}?immutable=1", uri=True)
        try:
            return int(file.execute("SELECT count(*) FROM t").fetchone()[0])
        finally:
            file.close()

    for n, name in enumerate("abc", start=1):
        async with sqlite.begin() as conn:
            await conn.execute(text("INSERT INTO t (name) VALUES (:n)"), {"n": name})
        if n < 3:
            assert sum(trips.values()) == 0, trips
            assert in_database_file() == 0  # committed to the WAL only
    # The third commit went to the thread, and its checkpoint copied the WAL over.
    assert trips == {"waiting": 1}, trips
    assert in_database_file() == 3


@pytest.mark.parametrize(("journal", "begin", "holding", "statement"), [
    # Rollback journal, a writer committing (EXCLUSIVE): even readers must wait.
    ("DELETE", "BEGIN EXCLUSIVE", None, "SELECT count(*) FROM t"),
    # WAL (what the daemons use), a writer at work: a first write must wait.
    ("WAL", "BEGIN IMMEDIATE", None, "INSERT INTO t (name) VALUES ('mine')"),
    # Rollback journal, a reader at work: the write may go on, its commit must wait.
    ("DELETE", "BEGIN", "SELECT count(*) FROM t", "INSERT INTO t (name) VALUES ('mine')"),
], ids=["read_waits", "first_write_waits", "commit_waits"])
async def test_a_statement_that_must_wait_waits_off_the_loop(
        sqlite: AsyncEngine, tmp_path: Path, journal: str, begin: str, holding: str | None,
        statement: str) -> None:
    """While another connection holds the database, a statement or commit run on the
    loop's thread fails at once (busy timeout 0) and is sent to the connection's thread
    to wait there: the loop keeps running, and it succeeds once the other lets go."""
    async with sqlite.connect() as conn:
        await conn.execute(text(f"PRAGMA journal_mode={journal}"))
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold, args=(tmp_path / "x.db", begin, held, release,
                                                 holding or _OTHER_ROW))
    holder.start()
    try:
        assert await asyncio.to_thread(held.wait, 10)

        async def run() -> Any:
            async with sqlite.begin() as conn:
                return (await conn.execute(text(statement))).rowcount

        work = asyncio.ensure_future(run())
        asyncio.get_running_loop().call_later(0.3, release.set)
        _, ticks = await ticks_while(work)
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 10)
    assert ticks >= 10  # about 30 in the 0.3 s the other held the database
    async with sqlite.connect() as conn:
        names = (await conn.execute(text("SELECT name FROM t ORDER BY id"))).scalars().all()
    assert names[0] == ("mine" if holding else "other")


async def test_in_wal_a_read_never_waits_for_a_writer(
        sqlite: AsyncEngine, tmp_path: Path, trips: collections.Counter[str]) -> None:
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold, args=(tmp_path / "x.db", "BEGIN IMMEDIATE",
                                                 held, release, _OTHER_ROW))
    holder.start()
    try:
        assert await asyncio.to_thread(held.wait, 10)
        async with sqlite.connect() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one()
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 10)
    assert count == 0  # the other's row is not committed yet
    assert sum(trips.values()) == 0, trips


async def test_results_counts_and_row_ids(sqlite: AsyncEngine) -> None:
    async with sqlite.begin() as conn:
        made = await conn.execute(text("INSERT INTO t (name) VALUES ('a')"))
        assert made.lastrowid == 1
        await conn.execute(text("INSERT INTO t (name) VALUES (:n)"), [{"n": "b"}, {"n": "c"}])
        changed = await conn.execute(text("UPDATE t SET name = name || '!' WHERE id > 1"))
        assert changed.rowcount == 2
    async with sqlite.connect() as conn:
        rows = (await conn.execute(text("SELECT id, name FROM t ORDER BY id"))).all()
    assert [tuple(r) for r in rows] == [(1, "a"), (2, "b!"), (3, "c!")]


async def test_rollback_undoes_and_errors_are_sqlalchemy_errors(sqlite: AsyncEngine) -> None:
    async with sqlite.connect() as conn:
        await conn.execute(text("INSERT INTO t (name) VALUES ('kept')"))
        await conn.commit()
        await conn.execute(text("INSERT INTO t (name) VALUES ('undone')"))
        await conn.rollback()
        with pytest.raises(IntegrityError):
            await conn.execute(text("INSERT INTO t (name) VALUES ('kept')"))
        await conn.rollback()
        names = (await conn.execute(text("SELECT name FROM t"))).scalars().all()
    assert names == ["kept"]


async def test_a_connection_opened_while_another_process_rebuilds_the_wal_index_waits(
        tmp_path: Path) -> None:
    """The first connection to open a WAL database after the last one closed rebuilds
    its index; one opening at that moment gets SQLITE_BUSY_RECOVERY, which Python
    reports as such, not as SQLITE_BUSY. It failed at once with "database is locked"
    (three engines opening one file together did this); it waits, in the connection's
    thread, and goes on when the index is rebuilt."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    made = make_engine(url)
    async with made.begin() as conn:
        await conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
    await made.dispose()  # the last connection: the WAL and its index are gone

    engine = make_engine(url)
    released = False

    def release_after(release: Any) -> None:
        nonlocal released
        released = True
        release()

    async def connect() -> str:
        async with engine.connect() as conn:
            mode = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
            await conn.execute(text("SELECT count(*) FROM t"))
            return str(mode)

    try:
        async with rebuilding_wal_index(tmp_path / "x.db") as release:
            asyncio.get_running_loop().call_later(0.3, release_after, release)
            mode, ticks = await asyncio.wait_for(ticks_while(connect()), 10)
        assert released  # connected only once the other process let go
        assert mode == "wal"
        assert ticks >= 10  # the loop ran while the connection waited
        async with engine.connect() as conn:
            busy = (await conn.execute(text("PRAGMA busy_timeout"))).scalar_one()
        assert busy == 0  # outside a trip to the connection's thread, it never waits
    finally:
        await engine.dispose()
