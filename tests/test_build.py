"""Build invariants: generated protobuf code is current; migrations go up and down."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from shared.db.engine import downgrade, upgrade
from shared.db.models import Base

ROOT = Path(__file__).resolve().parent.parent


def test_generated_protos_are_current(tmp_path: Path) -> None:
    """Regenerating into a copy of the tree must change nothing."""
    for part in ("proto", "scripts", "shared/pb"):
        shutil.copytree(ROOT / part, tmp_path / part)
    subprocess.run(["bash", "scripts/gen_protos.sh"], cwd=tmp_path, check=True,
                   env={**os.environ, "PYTHON": sys.executable})
    fresh, committed = tmp_path / "shared/pb/v1", ROOT / "shared/pb/v1"
    names = sorted(p.name for p in committed.iterdir() if p.suffix in (".py", ".pyi"))
    assert names == sorted(p.name for p in fresh.iterdir() if p.suffix in (".py", ".pyi"))
    stale = [n for n in names if not filecmp.cmp(fresh / n, committed / n, shallow=False)]
    assert stale == [], f"run scripts/gen_protos.sh: {stale} differ from proto/"


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url.replace("+aiosqlite", ""))
    try:
        return set(sa.inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def test_migrations_upgrade_and_downgrade(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    upgrade(url)
    assert _tables(url) == set(Base.metadata.tables)
    downgrade(url, "base")
    assert _tables(url) == set()
    upgrade(url)
    assert _tables(url) == set(Base.metadata.tables)


def test_models_match_migrations(tmp_path: Path) -> None:
    """No model change is left without a migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    url = f"sqlite+aiosqlite:///{tmp_path / 'state.db'}"
    upgrade(url)
    engine = sa.create_engine(url.replace("+aiosqlite", ""))
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []
