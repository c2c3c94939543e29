"""The two storage backends the tests run on: SQLite files, and databases on a PostgreSQL
server named by FLEETWIRE_TEST_POSTGRES_URL (`.ci/run` starts one)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import asyncpg
import pytest

from shared.db.engine import upgrade

POSTGRES_URL_ENV = "FLEETWIRE_TEST_POSTGRES_URL"
BACKENDS = ("sqlite", "postgresql")
SKIP_POSTGRES = (
    f"PostgreSQL cases skipped: {POSTGRES_URL_ENV} is not set. To run them, start a "
    "throwaway server with `export FLEETWIRE_TEST_POSTGRES_URL=$(scripts/pg-cluster.sh "
    "start /tmp/fwpg)` (stop it with `scripts/pg-cluster.sh stop /tmp/fwpg`), or run "
    "`.ci/run`, which does both.")


def postgres_url() -> str:
    """The server's URL, or skip the calling test saying how to get one."""
    url = os.environ.get(POSTGRES_URL_ENV, "")
    if not url:
        pytest.skip(SKIP_POSTGRES)
    return url


def with_database(url: str, name: str) -> str:
    return f"{url.rsplit('/', 1)[0]}/{name}"


def _dsn(url: str) -> str:
    """asyncpg's own URL form (no SQLAlchemy driver part)."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _admin(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(_dsn(url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


async def create_database(url: str, *, template: str = "") -> str:
    """A new empty (or template-copied) database on url's server; returns its URL."""
    name = "fw_" + secrets.token_hex(6)
    await _admin(url, f"CREATE DATABASE {name}"
                      + (f" TEMPLATE {template}" if template else ""))
    return with_database(url, name)


async def drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    await _admin(with_database(url, "postgres"), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class Templates:
    """One database per backend migrated to head per test session; tests get copies."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._sqlite: Path | None = None
        self._postgres: str = ""

    def sqlite(self) -> Path:
        if self._sqlite is None:
            self._sqlite = self._root / "template.db"
            upgrade(f"sqlite+aiosqlite:///{self._sqlite}")
        return self._sqlite

    async def postgres(self) -> str:
        """The name of the migrated template database on the test server."""
        if not self._postgres:
            url = await create_database(postgres_url())
            # Alembic runs its own event loop; not inside this one.
            await asyncio.to_thread(upgrade, url)
            self._postgres = url.rsplit("/", 1)[1]
        return self._postgres

    def drop_all(self) -> None:
        if self._postgres:
            asyncio.run(drop_database(with_database(postgres_url(), self._postgres)))


@contextmanager
def template_databases(root: Path) -> Iterator[Templates]:
    templates = Templates(root)
    try:
        yield templates
    finally:
        templates.drop_all()


@asynccontextmanager
async def migrated_copy(backend: str, templates: Templates, folder: Path
                        ) -> AsyncIterator[str]:
    """The URL of a fresh database at head on backend, dropped afterwards."""
    if backend == "sqlite":
        shutil.copyfile(await asyncio.to_thread(templates.sqlite), folder / "s.db")
        yield f"sqlite+aiosqlite:///{folder / 's.db'}"
        return
    url = await create_database(postgres_url(), template=await templates.postgres())
    try:
        yield url
    finally:
        await drop_database(url)
