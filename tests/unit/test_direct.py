"""Direct: prebuilt statements on SQLite's own connection (through the engine on
PostgreSQL), with the values a session would give, and through the engine wherever
SQLite would have to wait."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.exc import InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.db import models, sqlite_driver
from shared.db.direct import Direct, Statements, direct_for, mapped_columns, to_model
from shared.db.engine import dispose, make_engine, make_sessions
from tests.databases import Templates, migrated_copy
from tests.unit.holding import hold, rebuilding_wal_index, ticks_while

J = models.JoinToken
_TOKEN = select(J.name, J.pending, J.expires_at_ms).where(J.name == bindparam("b_id"))
_PEND = update(J).where(J.name == bindparam("b_id")).values(pending=bindparam("b_p"))


async def _add_token(sessions: async_sessionmaker[AsyncSession], token_id: str) -> None:
    async with sessions() as session, session.begin():
        session.add(J(token_sha256=token_id * 8, name=token_id, created_at_ms=1,
                      expires_at_ms=2, pending=True))


async def test_values_are_those_a_session_reads(
        engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_token(sessions, "tok-1")
    direct = direct_for(engine)
    # A Boolean comes back as bool, not SQLite's 1; a missing row as None.
    assert await direct.first(_TOKEN, {"b_id": "tok-1"}) == ("tok-1", True, 2)
    assert await direct.first(_TOKEN, {"b_id": "absent"}) is None
    assert await direct.write(_PEND, {"b_id": "tok-1", "b_p": False}) == 1
    assert await direct.write(_PEND, {"b_id": "absent", "b_p": False}) == 0
    async with sessions() as session:
        # Committed: another connection (the session's) sees it.
        assert (await session.execute(select(J.pending).where(J.name == "tok-1"))
                ).scalar_one() is False
    assert direct.detours == 0


async def test_rows_become_instances_with_the_rows_values(
        engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_token(sessions, "tok-2")
    keys, columns = mapped_columns(J)
    row = await direct_for(engine).first(select(*columns).where(J.name == "tok-2"))
    assert row is not None
    token = to_model(J, keys, row)
    async with sessions() as session:
        loaded = (await session.execute(select(J).where(J.name == "tok-2"))).scalar_one()
        assert {k: getattr(token, k) for k in keys} == {k: getattr(loaded, k) for k in keys}


async def test_values_fixed_in_a_statement_go_with_the_callers_values(
        engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> None:
    for token_id in ("tok-3", "tok-4"):
        await _add_token(sessions, token_id)
    # expires_at_ms == 2 is fixed in the statement, the name is the caller's; the update
    # and the insert below mix fixed values and the caller's too (the insert's by
    # column name).
    fixed = select(J.name).where(J.expires_at_ms == 2, J.name == bindparam("b_id"),
                                 J.pending.is_(True))
    direct = direct_for(engine)
    assert await direct.rows(fixed, {"b_id": "tok-4"}) == [("tok-4",)]
    assert await direct.rows(fixed, {"b_id": "tok-3"}) == [("tok-3",)]
    assert await direct.write(update(J).where(J.name == bindparam("b_id")).values(
        pending=False, expires_at_ms=bindparam("b_at")), {"b_id": "tok-3", "b_at": 7}) == 1
    assert await direct.rows(fixed, {"b_id": "tok-3"}) == []
    assert await direct.first(select(J.pending, J.expires_at_ms).where(J.name == "tok-3")
                              ) == (False, 7)
    assert await direct.write(insert(J).values(pending=True), {
        "token_sha256": "y" * 8, "name": "tok-5", "created_at_ms": 1,
        "expires_at_ms": 2}) == 1
    assert await direct.rows(fixed, {"b_id": "tok-5"}) == [("tok-5",)]


@pytest.fixture
async def sqlite_file(templates: Templates, tmp_path: Path) -> AsyncIterator[Path]:
    async with migrated_copy("sqlite", templates, tmp_path) as url:
        yield Path(url.split("///", 1)[1])


@pytest.mark.parametrize(("statement", "params", "problem"), [
    (select(J.name).where(J.name.in_(["a", "b"])), {}, "no IN lists"),
    (select(J.name).where(J.name == bindparam("b_id")), {}, "b_id"),
    # pending is not given: SQLAlchemy would fill in its Python-side default.
    (insert(J), {"token_sha256": "x", "name": "x", "created_at_ms": 1,
                 "expires_at_ms": 2}, "every value given"),
    # Its value would be computed at each execution.
    (select(J.name).where(J.name == bindparam("b_id", callable_=lambda: "tok")), {},
     "computed parameters"),
])
async def test_a_statement_it_cannot_run_as_built_is_refused_before_it_runs(
        sqlite_file: Path, statement: Any, params: dict[str, Any], problem: str) -> None:
    # Statements are compiled for SQLite's connection only (PostgreSQL runs them through
    # the engine, as SQLAlchemy would).
    engine = make_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    direct = Direct(engine)
    try:
        with pytest.raises((ValueError, InvalidRequestError), match=problem):
            await direct.rows(statement, params)
    finally:
        direct.close()
        await dispose(engine)


async def _with_holder(path: Path, begin: str, work: Any) -> tuple[Any, int]:
    """Run work while another connection holds the database (writing) for 0.3 s; how
    often a 10 ms ticker ran meanwhile (the event loop kept going)."""
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=hold, args=(
        path, begin, held, release, "UPDATE security_epoch SET value = value + 1"))
    holder.start()
    try:
        assert await asyncio.to_thread(held.wait, 10)
        task = asyncio.ensure_future(work)
        asyncio.get_running_loop().call_later(0.3, release.set)
        return await asyncio.wait_for(ticks_while(task), 10)
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 10)


async def test_a_write_another_writer_blocks_waits_in_the_engines_thread(
        sqlite_file: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    sessions = make_sessions(engine)
    try:
        await _add_token(sessions, "tok-3")
        direct = direct_for(engine)
        changed, ticks = await _with_holder(sqlite_file, "BEGIN IMMEDIATE", direct.write(
            _PEND, {"b_id": "tok-3", "b_p": False}))
        assert changed == 1
        assert direct.detours == 1
        assert ticks >= 10
        assert await direct.first(_TOKEN, {"b_id": "tok-3"}) == ("tok-3", False, 2)
    finally:
        await dispose(engine)


async def test_a_read_that_would_wait_goes_through_the_engine(sqlite_file: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    try:
        direct = direct_for(engine)
        epoch = select(models.SecurityEpoch.value)
        before = await direct.first(epoch)
        assert before is not None
        # In WAL mode (what daemons use) nothing makes a reader wait while Direct's
        # connection is open; in rollback-journal mode a committing writer does.
        assert await direct.first(select(models.SecurityEpoch.value).where(
            models.SecurityEpoch.id == 1)) == before
        direct._connection().execute("PRAGMA journal_mode=DELETE")  # type: ignore[union-attr]
        row, ticks = await _with_holder(sqlite_file, "BEGIN EXCLUSIVE", direct.first(epoch))
        assert row == (before[0] + 1,)  # read after the holder committed
        assert direct.detours == 1
        assert ticks >= 10
    finally:
        await dispose(engine)


async def test_a_connection_it_cannot_open_yet_sends_its_reads_through_the_engine(
        sqlite_file: Path) -> None:
    """Another process rebuilding the WAL index while Direct opens its connection (its
    set-up gets SQLITE_BUSY_RECOVERY): this read goes through the engine, which waits in
    its connection's thread, and the next one opens Direct's connection."""
    engine = make_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    try:
        direct = direct_for(engine)
        epoch = select(models.SecurityEpoch.value)
        async with rebuilding_wal_index(sqlite_file) as release:
            asyncio.get_running_loop().call_later(0.3, release)
            row, ticks = await asyncio.wait_for(ticks_while(direct.first(epoch)), 10)
        assert row is not None
        assert direct.detours == 1
        assert ticks >= 10
        assert await direct.first(epoch) == row
        assert direct._conn is not None  # opened on the second read
        assert direct.detours == 1
    finally:
        await dispose(engine)


async def test_direct_commits_count_towards_checkpoints(
        sqlite_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_driver, "CHECKPOINT_EVERY", 3)
    monkeypatch.setattr(sqlite_driver, "_commits", itertools.count(1))
    engine = make_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    sessions = make_sessions(engine)
    try:
        await _add_token(sessions, "tok-4")  # commit 1
        direct = direct_for(engine)

        def in_database_file() -> bool | None:
            """The token's pending flag in the database file itself, not the WAL."""
            file = sqlite3.connect(f"file:{sqlite_file}?immutable=1", uri=True)
            try:
                row = file.execute("SELECT pending FROM join_tokens WHERE name = 'tok-4'"
                                   ).fetchone()
                return None if row is None else bool(row[0])
            finally:
                file.close()

        await direct.write(_PEND, {"b_id": "tok-4", "b_p": False})  # commit 2
        assert in_database_file() is None  # in the WAL only
        await direct.write(_PEND, {"b_id": "tok-4", "b_p": True})  # 3: checkpoint
        assert in_database_file() is True
    finally:
        await dispose(engine)


async def test_after_dispose_statements_go_through_the_engine(sqlite_file: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    direct = direct_for(engine)
    assert await direct.first(select(models.SecurityEpoch.id)) == (1,)
    await dispose(engine)
    # A fresh Direct for the engine, with no connection of its own left open.
    assert direct_for(engine) is not direct
    assert direct._connection() is None
    assert await direct.first(select(models.SecurityEpoch.id)) == (1,)
    await engine.dispose()


_TOKEN_ROW = {"token_sha256": "f" * 64, "name": "tok-6", "created_at_ms": 1,
              "expires_at_ms": 2, "pending": True}


async def test_a_transaction_commits_all_its_statements_or_none(
        engine: AsyncEngine, sessions: async_sessionmaker[AsyncSession]) -> None:
    await _add_token(sessions, "tok-5")
    direct = direct_for(engine)

    def both(tx: Statements) -> Any:
        assert tx.run(_PEND, {"b_id": "tok-5", "b_p": False}) == 1
        tx.run(insert(J), _TOKEN_ROW)
        # A transaction reads what it wrote.
        return tx.first(_TOKEN, {"b_id": "tok-5"}), tx.rows(_TOKEN, {"b_id": "tok-6"})

    assert await direct.transaction(both) == (("tok-5", False, 2), [("tok-6", True, 2)])

    def half(tx: Statements) -> None:
        tx.run(_PEND, {"b_id": "tok-5", "b_p": True})
        tx.run(delete(J).where(J.name == bindparam("b_id")), {"b_id": "tok-6"})
        raise LookupError("refused half way")

    with pytest.raises(LookupError, match="half way"):
        await direct.transaction(half)
    # Neither of half's statements stayed, on either backend.
    assert await direct.rows(select(J.name, J.pending, J.expires_at_ms)
                             .where(J.name.like("tok-%")).order_by(J.name)) == [
        ("tok-5", False, 2), ("tok-6", True, 2)]
    assert direct.detours == 0
    async with sessions() as session:
        assert (await session.execute(select(J.pending).where(J.name == "tok-5"))
                ).scalar_one() is False


async def test_a_transaction_another_writer_blocks_runs_in_the_engines_thread(
        sqlite_file: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    try:
        direct = direct_for(engine)
        runs = []

        def count_up(tx: Statements) -> int:
            runs.append(tx.dialect)
            tx.run(_EPOCH_UP)
            found = tx.first(_EPOCH)
            assert found is not None
            return int(found[0])

        before = await direct.first(_EPOCH)
        assert before is not None
        # Its BEGIN IMMEDIATE would wait: nothing ran here; all of it waited there.
        after, ticks = await _with_holder(sqlite_file, "BEGIN IMMEDIATE",
                                          direct.transaction(count_up))
        assert after == before[0] + 2  # the holder's increment, then this one's
        assert runs == ["sqlite"]
        assert direct.detours == 1
        assert ticks >= 10
    finally:
        await dispose(engine)


async def test_a_transaction_whose_commit_would_wait_runs_again_in_the_engines_thread(
        sqlite_file: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{sqlite_file}")
    try:
        direct = direct_for(engine)
        runs = 0

        def count_up(tx: Statements) -> None:
            nonlocal runs
            runs += 1
            tx.run(_EPOCH_UP)

        before = await direct.first(_EPOCH)
        assert before is not None
        # In rollback-journal mode a commit waits for readers: here one holds the
        # database for 0.3 s. The first run is rolled back; the second one waits.
        direct._connection().execute("PRAGMA journal_mode=DELETE")  # type: ignore[union-attr]
        held, release = threading.Event(), threading.Event()
        reader = threading.Thread(target=hold, args=(
            sqlite_file, "BEGIN", held, release, "SELECT value FROM security_epoch"))
        reader.start()
        try:
            assert await asyncio.to_thread(held.wait, 10)
            asyncio.get_running_loop().call_later(0.3, release.set)
            _, ticks = await asyncio.wait_for(ticks_while(direct.transaction(count_up)), 10)
        finally:
            release.set()
            await asyncio.to_thread(reader.join, 10)
        assert runs == 2
        assert direct.detours == 1
        assert ticks >= 10
        assert await direct.first(_EPOCH) == (before[0] + 1,)  # counted once
    finally:
        await dispose(engine)


_EPOCH = select(models.SecurityEpoch.value).where(models.SecurityEpoch.id == 1)
_EPOCH_UP = (update(models.SecurityEpoch).where(models.SecurityEpoch.id == 1)
             .values(value=models.SecurityEpoch.value + 1))
