"""Unit-test databases, on both backends: one database per backend is migrated to head
per session, and each test works on a copy of it. Every test that asks for `db_url`,
`engine` or `sessions` runs once on SQLite and once on PostgreSQL (skipped, saying how to
run it, when no server is configured)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared.db.engine import make_engine, make_sessions
from tests.databases import BACKENDS, Templates, migrated_copy, template_databases


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Templates]:
    with template_databases(tmp_path_factory.mktemp("templates")) as made:
        yield made


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def db_url(backend: str, templates: Templates, tmp_path: Path) -> AsyncIterator[str]:
    """This test's own database at head."""
    async with migrated_copy(backend, templates, tmp_path) as url:
        yield url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return make_sessions(engine)
