"""The hottest statements, run on SQLite's own connection instead of through a session.

A point query through an AsyncSession costs about 600 µs of CPU on the machines this
project is measured on: a session and a pooled connection set up and torn down, a
greenlet switch, the ORM's loading of an instance. SQLite's own part is about 12 µs.
A status query paid that three times on the way through a hub and a spoke (the agent
read on each, the message id recorded on the spoke), more than all the signing and
verifying.

`Direct` runs a prebuilt Core statement on one sqlite3 connection of its own, on the
event loop's thread:

- Each statement is compiled once for the engine's dialect; its parameters and columns
  go through the same type converters SQLAlchemy would apply, so the values are the
  ones a session returns.
- Reads: in WAL mode a reader never waits for a writer, and busy_timeout=0 makes the
  rare case that would wait (recovery after a crash) fail at once. A statement that
  would wait has done nothing and is run through the engine instead, where waiting
  happens in the connection's thread (shared/db/sqlite_driver.py).
- Writes: one statement, committed on its own (autocommit). The caller holds the
  daemon's write lock, as every writer of the daemon does, so the statement only ever
  meets a writer of another process (the CLI), and then goes through the engine as a
  read would. Its commit counts towards sqlite_driver's checkpoints.

- Transactions: `transaction(body)` runs a function's statements between BEGIN
  IMMEDIATE and COMMIT on that connection. body is synchronous, so nothing else on the
  loop runs (or reads this connection) while the transaction is open. Where SQLite
  would wait (at BEGIN, at a statement, at COMMIT), everything is rolled back and body
  runs again through the engine.

On PostgreSQL (and in-memory SQLite) every call goes through the engine, as Core: a
connection from the pool, no session. ADR 0019 records the decision; ADR 0020 the
transactions.
"""

from __future__ import annotations

import asyncio
import sqlite3
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, inspect
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlalchemy.sql import ClauseElement, Executable
from sqlalchemy.sql.compiler import SQLCompiler

from shared.db import sqlite_driver

M = TypeVar("M")
T = TypeVar("T")

Row = tuple[Any, ...]
_Params = Mapping[str, Any]


@dataclass(frozen=True)
class _Prepared:
    """A statement compiled once: its SQL, where each of its positional parameters
    comes from and how it is converted, and how to convert each column it returns."""

    sql: str
    # Per positional parameter: (the caller's key, None) for a value the caller gives,
    # (None, value) for one fixed in the statement (`where(id == 1)`).
    sources: tuple[tuple[str | None, Any], ...]
    binds: tuple[Callable[[Any], Any] | None, ...]
    columns: tuple[Callable[[Any], Any] | None, ...]

    def arguments(self, params: _Params) -> list[Any]:
        args = []
        for (key, fixed), convert in zip(self.sources, self.binds, strict=True):
            value = fixed if key is None else params[key]
            args.append(value if convert is None or value is None else convert(value))
        return args

    def convert(self, rows: list[Row]) -> list[Row]:
        if not any(self.columns):
            return rows
        return [tuple(v if c is None or v is None else c(v)
                      for v, c in zip(row, self.columns, strict=True)) for row in rows]


class Statements:
    """The statements of one transaction: what a body given to Direct.transaction
    runs."""

    dialect: str
    # What to run once the transaction committed (never if it rolled back).
    committed: list[Callable[[], None]]

    def after_commit(self, action: Callable[[], None]) -> None:
        """Run action once this transaction has committed (never if it rolls back):
        telling watchers of a change that might not persist would tell them something
        false."""
        self.committed.append(action)

    def rows(self, statement: Executable, params: _Params | None = None) -> list[Row]:
        """Every row the statement returns, as tuples in its column order."""
        return self._run(statement, params or {}, fetch=True)[1]

    def first(self, statement: Executable, params: _Params | None = None) -> Row | None:
        found = self.rows(statement, params)
        return found[0] if found else None

    def run(self, statement: Executable, params: _Params | None = None) -> int:
        """Run a changing statement; how many rows it changed."""
        return self._run(statement, params or {}, fetch=False)[0]

    def _run(self, statement: Executable, params: _Params, *, fetch: bool
             ) -> tuple[int, list[Row]]:
        raise NotImplementedError


class _Here(Statements):
    """On the SQLite connection of a Direct, on the loop's thread."""

    def __init__(self, direct: Direct, conn: sqlite3.Connection) -> None:
        self._direct = direct
        self._conn = conn
        self.dialect = direct.dialect
        self.committed = []

    def _run(self, statement: Executable, params: _Params, *, fetch: bool
             ) -> tuple[int, list[Row]]:
        prepared = self._direct._prepare(statement, params)
        try:
            cursor = self._conn.execute(prepared.sql, prepared.arguments(params))
            return cursor.rowcount, prepared.convert(cursor.fetchall()) if fetch else []
        except sqlite3.OperationalError as exc:
            if sqlite_driver.would_wait(exc):
                raise _WouldWait from exc
            raise


class _Through(Statements):
    """On an engine's (synchronous) connection: on PostgreSQL, or where SQLite would
    wait (it waits in the connection's thread)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.dialect = conn.dialect.name
        self.committed = []

    def _run(self, statement: Executable, params: _Params, *, fetch: bool
             ) -> tuple[int, list[Row]]:
        result = self._conn.execute(statement, dict(params))
        if fetch:
            return -1, [tuple(row) for row in result]
        return int(getattr(result, "rowcount", 0)), []


class _WouldWait(Exception):
    """A statement of a transaction on the loop's thread would have to wait."""


class Direct:
    """Prebuilt statements on the engine's database, the cheapest way it allows."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self.dialect = engine.dialect.name
        # Opened on first use (again after a failed open), for a SQLite file only.
        self._conn: sqlite3.Connection | None = None
        self._local = _is_file(engine)
        self._prepared: dict[tuple[Executable, tuple[str, ...]], _Prepared] = {}
        # How many statements had to go through the engine (what the tests look at).
        self.detours = 0

    async def rows(self, statement: Executable, params: _Params | None = None) -> list[Row]:
        """Every row the query returns, as tuples in its column order."""
        params = params or {}
        done = self._here(statement, params, write=False)
        if done is not None:
            return done[1]
        async with self._engine.connect() as conn:
            return [tuple(row) for row in await conn.execute(statement, params)]

    async def first(self, statement: Executable, params: _Params | None = None
                    ) -> Row | None:
        found = await self.rows(statement, params)
        return found[0] if found else None

    async def write(self, statement: Executable, params: _Params | None = None) -> int:
        """Run one changing statement in a transaction of its own; how many rows it
        changed. The caller holds the daemon's write lock."""
        params = params or {}
        done = self._here(statement, params, write=True)
        if done is not None:
            if sqlite_driver.checkpoint_due():
                await asyncio.to_thread(_checkpoint, self._engine)
            return done[0]
        async with self._engine.begin() as conn:
            return int(getattr(await conn.execute(statement, params), "rowcount", 0))

    async def transaction(self, body: Callable[[Statements], T]) -> T:
        """Run body's statements in one write transaction and commit it; body's result.
        The caller holds the daemon's write lock.

        body is synchronous and changes nothing but through its Statements: it may run
        twice, its first run rolled back, when SQLite would have had to wait.
        """
        conn = self._connection()
        if conn is not None:
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    here = _Here(self, conn)
                    result = body(here)
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except _WouldWait:
                pass
            except sqlite3.OperationalError as exc:
                # BEGIN or COMMIT would have waited (COMMIT's transaction was rolled
                # back above).
                if not sqlite_driver.would_wait(exc):
                    raise
            else:
                _run_all(here.committed)
                if sqlite_driver.checkpoint_due():
                    await asyncio.to_thread(_checkpoint, self._engine)
                return result
            self.detours += 1
        async with self._engine.begin() as engine_conn:
            sync = engine_conn.sync_connection
            assert sync is not None
            through = _Through(sync)
            result = await engine_conn.run_sync(lambda _: body(through))
        _run_all(through.committed)
        return result

    def close(self) -> None:
        self._local = False
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _here(self, statement: Executable, params: _Params, *, write: bool
              ) -> tuple[int, list[Row]] | None:
        """Run the statement on this thread: (rows changed, rows returned), or None if
        it would have to wait (it did nothing) or there is no connection here."""
        conn = self._connection()
        if conn is None:
            return None
        prepared = self._prepare(statement, params)
        try:
            cursor = conn.execute(prepared.sql, prepared.arguments(params))
            rows = [] if write else prepared.convert(cursor.fetchall())
        except sqlite3.OperationalError as exc:
            if not sqlite_driver.would_wait(exc):
                raise
            self.detours += 1
            return None
        return cursor.rowcount, rows

    def _connection(self) -> sqlite3.Connection | None:
        if self._conn is None and self._local:
            try:
                self._conn = _connect(self._engine)
            except sqlite3.OperationalError as exc:
                if not sqlite_driver.would_wait(exc):
                    raise
                # Locked while being set up (another process's exclusive lock, or its
                # rebuilding of the WAL index): this call goes through the engine, the
                # next one tries again.
                self.detours += 1
                return None
            weakref.finalize(self, self._conn.close)
        return self._conn

    def _prepare(self, statement: Executable, params: _Params) -> _Prepared:
        key = (statement, tuple(sorted(params)))
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self._prepared[key] = _compile(statement, self._engine, key[1])
        return prepared


def _compile(statement: Executable, engine: AsyncEngine, keys: Sequence[str]) -> _Prepared:
    dialect = engine.dialect
    compiled = cast(ClauseElement, statement).compile(dialect=dialect, column_keys=list(keys))
    assert isinstance(compiled, SQLCompiler)
    if compiled.post_compile_params:
        raise ValueError(f"direct statements take no IN lists (expanded per call): {compiled}")
    if compiled.insert_prefetch or compiled.update_prefetch:
        # A value SQLAlchemy would compute at execution (a Python-side default) is not
        # computed here.
        raise ValueError(f"direct statements need every value given: {compiled}")
    # Raises now, not per call, if a parameter the statement needs is not among keys.
    compiled.construct_params({k: None for k in keys})
    names = tuple(compiled.positiontup or ())
    processors = compiled._bind_processors
    return _Prepared(
        sql=str(compiled), sources=_sources(compiled, names, keys),
        binds=tuple(processors.get(n) for n in names),  # type: ignore[misc]
        columns=tuple(c.type._cached_result_processor(dialect, None)
                      for c in compiled._result_columns))


@dataclass(frozen=True)
class _Given:
    """Stands for the caller's value of key while a statement's parameters are traced."""

    key: str


def _sources(compiled: SQLCompiler, names: Sequence[str], keys: Sequence[str]
             ) -> tuple[tuple[str | None, Any], ...]:
    """Where each positional parameter's value comes from, worked out once instead of
    per call by SQLAlchemy's construct_params (which walks every bind each time): from
    the caller's key, or fixed in the statement. construct_params is asked once with a
    stand-in for each key, and its answer kept."""
    for name in names:
        if compiled.binds[name].callable is not None:
            raise ValueError(f"direct statements take no computed parameters: {compiled}")
    traced = compiled.construct_params({k: _Given(k) for k in keys}, _check=False)
    sources: list[tuple[str | None, Any]] = []
    for name in names:
        value = traced[name]
        sources.append((value.key, None) if isinstance(value, _Given) else (None, value))
    return tuple(sources)


def _run_all(actions: list[Callable[[], None]]) -> None:
    for action in actions:
        action()


def _is_file(engine: AsyncEngine) -> bool:
    """Whether engine's database is a SQLite file (not PostgreSQL, not in memory)."""
    url = engine.url
    return url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:")


def _connect(engine: AsyncEngine) -> sqlite3.Connection:
    """A connection of its own to engine's SQLite file, set up as the engine's are, in
    autocommit mode."""
    conn = _open(engine, isolation_level=None, check_same_thread=False)
    try:
        sqlite_driver.set_up(conn, enforce_foreign_keys=True)
    except BaseException:
        conn.close()
        raise
    return conn


def _open(engine: AsyncEngine, **options: Any) -> sqlite3.Connection:
    """A new sqlite3 connection to engine's database, as the engine's pool would open
    it, with options on top."""
    args, kwargs = engine.dialect.create_connect_args(engine.url)
    connect = cast(Callable[..., sqlite3.Connection], sqlite3.connect)
    return connect(*args, **{**kwargs, **options})


def _checkpoint(engine: AsyncEngine) -> None:
    """In a worker thread, on a connection opened for it: copy the WAL into the database
    file (PASSIVE: it takes what no reader still needs, and never waits)."""
    conn = _open(engine)
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    finally:
        conn.close()


_directs: weakref.WeakKeyDictionary[Any, Direct] = weakref.WeakKeyDictionary()


def direct_for(bind: AsyncEngine | async_sessionmaker[Any]) -> Direct:
    """The one Direct of an engine, or of the engine sessions are bound to (made on
    first use)."""
    engine = bind if isinstance(bind, AsyncEngine) else bind.kw.get("bind")
    if not isinstance(engine, AsyncEngine):
        raise TypeError("Direct needs an AsyncEngine, or sessions bound to one")
    found = _directs.get(engine.sync_engine)
    if found is None:
        found = _directs[engine.sync_engine] = Direct(engine)
    return found


def close_direct(engine: AsyncEngine) -> None:
    """Close the engine's Direct connection, if it has one (at shutdown)."""
    found = _directs.pop(engine.sync_engine, None)
    if found is not None:
        found.close()


def mapped_columns(model: type[Any]) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    """A mapped class's attribute names and their columns, in the same order: select
    the columns, and build instances with to_model."""
    attrs = inspect(model).column_attrs
    return tuple(a.key for a in attrs), tuple(a.columns[0] for a in attrs)


def to_model(model: type[M], keys: Sequence[str], values: Sequence[Any]) -> M:
    """A transient instance holding values, for reading (never add it to a session).

    Made the way the ORM's loading makes one (an instance with its state, values put in
    its __dict__), without running the constructor's per-attribute events: 2 µs here
    instead of 25.
    """
    instance: M = inspect(model).class_manager.new_instance()
    instance.__dict__.update(zip(keys, values, strict=True))
    return instance
