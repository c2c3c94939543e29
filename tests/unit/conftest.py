"""Unit-test databases: one SQLite file migrated to head per session; each test works on
a copy of it."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db.engine import make_engine, make_sessions, upgrade


@pytest.fixture(scope="session")
def migrated_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("migrated-template") / "s.db"
    upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture
async def sessions(tmp_path: Path, migrated_db: Path
                   ) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions on this test's own copy of the migrated database."""
    shutil.copyfile(migrated_db, tmp_path / "s.db")
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path}/s.db")
    try:
        yield make_sessions(engine)
    finally:
        await engine.dispose()
