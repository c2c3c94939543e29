"""Engine and session set-up, and running Alembic migrations from code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

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
    engine = create_async_engine(url, pool_pre_ping=not sqlite,
                                 pool_reset_on_return=None if sqlite else "rollback")
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=10000")
            cur.execute(f"PRAGMA foreign_keys={'ON' if enforce_foreign_keys else 'OFF'}")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

    return engine


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


def downgrade(url: str, revision: str) -> None:
    command.downgrade(_alembic_config(url), revision)

