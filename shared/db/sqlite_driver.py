"""SQLite under SQLAlchemy's async engine, with one trip to the connection's thread per
statement.

aiosqlite runs each sqlite3 connection in a thread of its own; every call is a trip
there and back (two thread wake-ups). SQLAlchemy's adapter makes four trips per
statement (cursor, execute, fetchall, close) and one per commit or rollback, even of a
transaction that never began. On the 2-core machines this project is measured on, a
trip costs about 130 µs of CPU, and a point query about 10 µs: the trips were most of
what a database call cost. Here a statement is one trip (execute, fetch every row,
close, all in the connection's thread), and ending a transaction that was never begun
is no trip at all. Nothing runs on the event loop's thread that could wait on the disk
or on a lock.

`make_engine` (shared/db/engine.py) passes `dbapi()` to SQLAlchemy for SQLite URLs.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import aiosqlite
from sqlalchemy.dialects.sqlite.aiosqlite import (
    AsyncAdapt_aiosqlite_connection,
    AsyncAdapt_aiosqlite_cursor,
    AsyncAdapt_aiosqlite_dbapi,
)

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
        # aiosqlite's own queue to its thread (what its Cursor uses); the version range
        # in pyproject.toml is the one this was written and tested against.
        outcome: _Outcome = await self._connection._execute(  # type: ignore[no-untyped-call]
            _run, self._connection._conn, sql, parameters, many)
        return outcome

    def _take(self, outcome: _Outcome) -> None:
        self.description, self.rowcount, self.lastrowid, self._rows = outcome

    async def fetchall(self) -> list[Any]:
        rows, self._rows = self._rows, []
        return rows

    def close(self) -> None:
        """Nothing to do: the sqlite3 cursor was closed in the trip that used it."""


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
            super().rollback()

    def commit(self) -> None:
        if self._connection._connection is not None and self._connection.in_transaction:
            super().commit()


class _Dbapi(AsyncAdapt_aiosqlite_dbapi):
    def connect(self, *arg: Any, **kw: Any) -> _Connection:
        adapted = super().connect(*arg, **kw)
        return _Connection(self, adapted._connection)


def dbapi() -> Any:
    """The DBAPI module to give create_async_engine(module=...) for sqlite+aiosqlite."""
    return _Dbapi(aiosqlite, sqlite3)
