"""SQLite under SQLAlchemy's async engine, with as few trips to the connection's thread
as waiting allows.

aiosqlite runs each sqlite3 connection in a thread of its own; every call is a trip
there and back (two thread wake-ups). SQLAlchemy's adapter makes four trips per
statement (cursor, execute, fetchall, close) and one per commit or rollback, even of a
transaction that never began. On the 2-core machines this project is measured on, a
trip costs about 130 µs of CPU, and a point query about 10 µs: the trips were most of
what a database call cost.

Here everything runs on the event loop's thread unless it would wait:

- Each statement, and each COMMIT and ROLLBACK, first runs on the loop's thread
  (execute, fetch every row, close). The connection's busy timeout is 0 outside a trip,
  so where SQLite would have to wait (another process's writer holds the database; a
  commit in rollback-journal mode waits for readers), it fails at once having done
  nothing, and is sent to the connection's thread, with the busy timeout raised to
  WAIT_MS for that trip. In WAL mode readers never wait, and a daemon's own writers
  take turns behind its write lock, so the trips are for other processes (the CLI).
- A commit in WAL mode with synchronous=NORMAL appends to the WAL without a sync. SQLite
  would checkpoint the WAL into the database file (writes and syncs) inside whichever
  commit crosses its threshold; here that is off, and every CHECKPOINT_EVERY-th commit
  of the process goes to the connection's thread and checkpoints there after it.
- Ending a transaction that never began is nothing at all.

The disk is touched on the loop's thread only to read pages of a small database, almost
always from the OS page cache, and to append to the WAL without fsync. ADR 0017 records
the decision; ADR 0018 the move of first writes and commits to the loop's thread.

`make_engine` (shared/db/engine.py) passes `dbapi()` to SQLAlchemy for SQLite URLs.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)
from sqlalchemy.util.concurrency import await_

_Outcome = tuple[Any, int, int | None, list[Any]]


class _OneTripCursor:
    """What SQLAlchemy's cursor adapter drives, in place of aiosqlite's Cursor: each
    execute runs on a fresh sqlite3 cursor in the connection's thread, fetches every
    row and closes it there, in one trip."""

    arraysize = 1

    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection
        self.description: Any = None
        self.rowcount = -1
        self.lastrowid: int | None = None
        self._rows: list[Any] = []

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> _OneTripCursor:
        self._take(await self._trip(sql, parameters, many=False))
        return self

    async def executemany(self, sql: str, parameters: Sequence[Any]) -> _OneTripCursor:
        self._take(await self._trip(sql, parameters, many=True))
        return self

    async def _trip(self, sql: str, parameters: Any, *, many: bool) -> _Outcome:
        raw: sqlite3.Connection | None = self._connection._conn
        if raw is not None:
            # SQLAlchemy uses a connection from one task at a time and awaits each call,
            # so its thread is idle now: running here never races it.
            try:
                return _run(raw, sql, parameters, many)
            except sqlite3.OperationalError as exc:
                if not would_wait(exc):
                    raise
                # It would have to wait (another writer, a checkpoint): it did nothing,
                # and goes where waiting is allowed.
        # aiosqlite's own queue to its thread (what its Cursor uses); the version range
        # in pyproject.toml is the one this was written and tested against.
        outcome: _Outcome = await self._connection._execute(  # type: ignore[no-untyped-call]
            _run_waiting, self._connection._conn, sql, parameters, many)
        return outcome

    def _take(self, outcome: _Outcome) -> None:
        self.description, self.rowcount, self.lastrowid, self._rows = outcome

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    def close(self) -> None:
        """Nothing to do: the sqlite3 cursor was closed in the trip that used it."""


# How long a statement sent to the connection's thread waits for another writer (or a
# checkpoint) before it fails with "database is locked".
WAIT_MS = 10_000
WOULD_WAIT = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})


def would_wait(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite failed because it would have had to wait for a lock (and did
    nothing). Python reports the extended result code: SQLITE_BUSY_RECOVERY, for one,
    comes while another connection rebuilds the WAL index, as the first to open a WAL
    database after the last one closed does. The primary code is its low byte."""
    return (exc.sqlite_errorcode & 0xFF) in WOULD_WAIT


# WAL pages are copied into the database file by a checkpoint in the connection's thread
# after every CHECKPOINT_EVERY-th commit of this process, not inside whichever commit
# crosses SQLite's threshold (the connect pragma turns that off): a checkpoint writes
# and syncs the database file, which a commit on the loop's thread must not do.
CHECKPOINT_EVERY = 200
_commits = itertools.count(1)


def checkpoint_due() -> bool:
    """Count one commit of this process; True if a checkpoint should follow it."""
    return next(_commits) % CHECKPOINT_EVERY == 0


def set_up(conn: Any, *, enforce_foreign_keys: bool) -> None:
    """The pragmas every connection of a daemon gets (conn: a sqlite3 connection, or
    the adapted one SQLAlchemy hands its connect event)."""
    cur = conn.cursor()
    # 0 outside a trip to the connection's thread: a statement run on the event loop's
    # thread fails rather than waits (this setting's own statements too).
    cur.execute("PRAGMA busy_timeout=0")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA foreign_keys={'ON' if enforce_foreign_keys else 'OFF'}")
    cur.execute("PRAGMA synchronous=NORMAL")
    # Checkpoints run in a worker thread every so many commits, never inside a commit.
    cur.execute("PRAGMA wal_autocheckpoint=0")
    cur.close()


def _run_waiting(raw: sqlite3.Connection, sql: str, parameters: Any, many: bool
                 ) -> _Outcome:
    """_run, allowed to wait up to WAIT_MS for a lock (in the connection's thread)."""
    raw.execute(f"PRAGMA busy_timeout={WAIT_MS}")
    try:
        return _run(raw, sql, parameters, many)
    finally:
        raw.execute("PRAGMA busy_timeout=0")


def _run(raw: sqlite3.Connection, sql: str, parameters: Any, many: bool) -> _Outcome:
    """In the connection's thread: run one statement and collect all it returns."""
    cursor = raw.cursor()
    try:
        if many:
            cursor.executemany(sql, parameters)
        else:
            cursor.execute(sql, parameters)
        rows = cursor.fetchall() if cursor.description else []
        return cursor.description, cursor.rowcount, cursor.lastrowid, rows
    finally:
        cursor.close()


class _Cursor(AsyncAdapt_aiosqlite_cursor):
    __slots__ = ()
    # close() is synchronous here (and free).
    _awaitable_cursor_close = False

    def _make_new_cursor(self, connection: Any) -> Any:
        return _OneTripCursor(connection)

    def _aenter_cursor(self, cursor: Any) -> Any:
        return cursor


class _Connection(AsyncAdapt_aiosqlite_connection):
    __slots__ = ()
    _cursor_cls = _Cursor

    # sqlite3 opens a transaction only before a write; a session that only read has
    # none to end, and SQLAlchemy ends every one. Read where the connection's thread is
    # idle (SQLAlchemy uses a connection from one task at a time).
    def rollback(self) -> None:
        if self._connection._connection is not None and self._connection.in_transaction:
            self._end(self._connection._conn.rollback, checkpoint=False)

    def commit(self) -> None:
        if self._connection._connection is not None and self._connection.in_transaction:
            self._end(self._connection._conn.commit, checkpoint=checkpoint_due())

    def _end(self, end: Callable[[], None], *, checkpoint: bool) -> None:
        """Commit or roll back on the loop's thread, or in the connection's thread if
        that would wait (or a checkpoint follows), allowed to wait like a write. In WAL
        mode with synchronous=NORMAL a commit appends to the WAL without a sync."""
        if not checkpoint:
            try:
                end()
                return
            except sqlite3.OperationalError as exc:
                if not would_wait(exc):
                    self._handle_exception(exc)
                # Busy: nothing was ended; the transaction is still open to end below.

        def waiting() -> None:
            raw = self._connection._conn
            raw.execute(f"PRAGMA busy_timeout={WAIT_MS}")
            try:
                end()
                if checkpoint:
                    raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            finally:
                raw.execute("PRAGMA busy_timeout=0")

        try:
            await_(self._connection._execute(waiting))
        except Exception as error:
            self._handle_exception(error)


class _Dbapi(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> _Connection:
        # Statements that cannot wait run on the event loop's thread (see above).
        kw["check_same_thread"] = False
        adapted = super().connect(*arg, **kw)
        return _Connection(self, adapted._connection)


def dbapi() -> Any:
    """The DBAPI module to give create_async_engine(module=...) for sqlite+aiosqlite."""
    return _Dbapi(aiosqlite, sqlite3)
