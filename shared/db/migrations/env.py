"""Alembic environment: runs migrations over the async engine of the configured URL."""

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

from shared.db.engine import MIGRATIONS_LOCK, make_engine
from shared.db.models import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Two hubs starting at once on one database: the second waits here, then
            # finds the schema at head. The lock ends with the migrations' transaction.
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                {"key": MIGRATIONS_LOCK})
        context.run_migrations()


async def _main() -> None:
    engine = make_engine(context.config.get_main_option("sqlalchemy.url") or "",
                         enforce_foreign_keys=False)
    async with engine.connect() as conn:
        await conn.run_sync(_run)
    await engine.dispose()


asyncio.run(_main())
