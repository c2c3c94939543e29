"""Engine and session set-up, and running Alembic migrations from code."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.migration import MigrationContext
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from shared.db import sqlite_driver
from shared.db.direct import close_direct

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str, *, enforce_foreign_keys: bool = True) -> AsyncEngine:
    """An async engine; SQLite gets WAL, a busy timeout and enforced foreign keys.

    Migrations run without enforcement: SQLite's batch mode rebuilds a table by dropping
    the old one, and with enforcement on that drop cascades into every table that points
    at it (rows of peer_keys vanished when peers was rebuilt).
    """
    sqlite = url.startswith("sqlite")
    # Every use of a connection goes through a session that ends its transaction before
    # handing the connection back, so the pool's own reset (a second ROLLBACK, one more
    # trip to SQLite's worker thread per session) is skipped for SQLite.
    # PostgreSQL: a pool large enough for a hub's concurrent requests (each holds a
    # connection only for one transaction).
    pool: dict[str, Any] = {} if sqlite else {"pool_size": 10, "max_overflow": 20}
    if url.startswith("sqlite+aiosqlite"):
        pool["module"] = sqlite_driver.dbapi()
    # hide_parameters: a statement's values (token digests, task text) never appear in
    # an error message, so never in a log line.
    engine = create_async_engine(url, pool_pre_ping=not sqlite, hide_parameters=True,
                                 pool_reset_on_return=None if sqlite else "rollback", **pool)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            sqlite_driver.set_up(dbapi_conn, enforce_foreign_keys=enforce_foreign_keys)

    return engine


async def dispose(engine: AsyncEngine) -> None:
    """Close what the engine holds: its pool, and the connection of its Direct (at a
    daemon's shutdown)."""
    close_direct(engine)
    await engine.dispose()


def is_postgres(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


async def lock_for_transaction(session: AsyncSession, key: int) -> None:
    """Serialise this transaction with every other one that takes the same key, in any
    process sharing the database. PostgreSQL: a transaction-level advisory lock, freed at
    commit or rollback. SQLite needs nothing: it has one writer at a time, and a
    database there belongs to one daemon."""
    if is_postgres(session):
        await session.execute(ADVISORY_XACT_LOCK, {"key": key})


# PostgreSQL: wait for the advisory lock :key, held until the transaction ends.
ADVISORY_XACT_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


# Advisory lock keys (any 64-bit numbers, fixed here once).
AUDIT_CHAIN_LOCK = 0x66770001
MIGRATIONS_LOCK = 0x66770002


def make_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


def _alembic_config(url: str) -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database to revision. Not for use inside a running event loop."""
    command.upgrade(_alembic_config(url), revision)


def current_revision(url: str) -> str:
    """The revision the database at url is at ("" before any). Not inside an event loop."""

    async def read() -> str:
        engine = make_engine(url)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(
                    lambda c: MigrationContext.configure(c).get_current_revision() or "")
        finally:
            await engine.dispose()

    return asyncio.run(read())


def downgrade(url: str, revision: str) -> None:
    command.downgrade(_alembic_config(url), revision)

