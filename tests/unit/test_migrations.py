"""Alembic migrations on a copy of a populated database, and the whole-tenant grant key."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import create_engine, insert, select, text
from sqlalchemy.exc import IntegrityError

from hub.tokens import authenticate, list_tokens
from shared.db import models
from shared.db.engine import (
    MIGRATIONS,
    downgrade,
    make_engine,
    make_sessions,
    upgrade,
)
from shared.db.models import ALL_WORKSPACES
from shared.errors import InvalidArgument
from shared.peers import add_peer
from shared.scope import Role
from shared.tenancy import create_tenant, create_workspace
from spoke.grants import add_grant, list_grants, tenant_grant
from tests.databases import create_database, drop_database, postgres_url

T0 = 1_700_000_000_000
TOKEN = "fwt_" + "k" * 43
TOKEN_SHA = hashlib.sha256(TOKEN.encode()).hexdigest()
PUBKEY = bytes(range(32))

APP_TABLES = {"peers", "peer_keys", "tenants", "workspaces", "grants", "operator_tokens",
              "agents", "hub_agents", "seen_messages"}

# Rows written against the 0001 schema, as a 0.1 instance would hold them.
SEED = {
    "peers": [(1, "hub-1", "127.0.0.1:7400", "ACTIVE", T0)],
    "peer_keys": [(1, 1, "0123456789abcdef", PUBKEY, "ACTIVE", T0)],
    "tenants": [(1, "acme", T0), (2, "globex", T0 + 1)],
    "workspaces": [(1, 1, "ws", T0), (2, 1, "ws2", T0), (3, 2, "main", T0)],
    "grants": [(1, 1, 1, "*", 2, T0), (2, 1, 2, "main", 1, T0)],
    "operator_tokens": [(1, TOKEN_SHA, 1, "alice", 3, T0, None),
                        (2, "b" * 64, 1, "bob", 1, T0, T0 + 5)],
    "agents": [("a1", "acme", "ws", "demo", "do it", "alice", "hub-1", "RUNNING", "", 4242,
                99887766, None, "/w/a1", "/w/a1.log", 5000, T0, T0 + 1, None)],
    "hub_agents": [("a1", "spoke-1", "acme", "ws", "demo", "alice", "RUNNING", "m1", T0)],
    "seen_messages": [("hub-1", "m1", "c" * 64, b"\x00signed\xff", T0)],
}


def url_of(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


def tables(db: Path) -> set[str]:
    with closing(sqlite3.connect(db)) as conn:
        return {n for (n,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}


def columns(db: Path, table: str) -> list[str]:
    with closing(sqlite3.connect(db)) as conn:
        return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def rows(db: Path, table: str, cols: int | None = None) -> list[tuple]:
    """All rows of table (their first `cols` columns), in a stable order."""
    with closing(sqlite3.connect(db)) as conn:
        got = conn.execute(f"SELECT * FROM {table}").fetchall()
    return sorted(r[:cols] if cols else r for r in got)


def version(db: Path) -> str | None:
    with closing(sqlite3.connect(db)) as conn:
        got = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert len(got) <= 1
    return got[0][0] if got else None


def script_head() -> str:
    return ScriptDirectory(str(MIGRATIONS)).get_current_head()


def seed_0001(db: Path) -> None:
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("PRAGMA foreign_keys=ON")
        for table, values in SEED.items():
            marks = ",".join("?" * len(values[0]))
            conn.executemany(f"INSERT INTO {table} VALUES ({marks})", values)


def copy_db(src: Path, dst: Path) -> Path:
    """A consistent copy of a closed database (WAL folded into the main file first)."""
    with closing(sqlite3.connect(src)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    shutil.copyfile(src, dst)
    return dst


def check_seed_rows(db: Path) -> None:
    for table, values in SEED.items():
        assert rows(db, table, len(values[0])) == sorted(values), table


def test_upgrade_downgrade_round_trip_keeps_the_data(tmp_path: Path) -> None:
    original = tmp_path / "v1.db"
    upgrade(url_of(original), "0001")
    assert version(original) == "0001"
    assert tables(original) == APP_TABLES | {"alembic_version"}
    assert "expires_at_ms" not in columns(original, "operator_tokens")
    seed_0001(original)

    db = copy_db(original, tmp_path / "copy.db")
    upgrade(url_of(db))
    assert version(db) == script_head()
    assert APP_TABLES | {"audit_log", "alembic_version"} <= tables(db)
    check_seed_rows(db)
    # The columns 0002 added come up NULL on old rows.
    cols = columns(db, "operator_tokens")
    assert [cols.index(c) for c in ("expires_at_ms", "replaced_by_id")] == [7, 8]
    assert [r[7:9] for r in rows(db, "operator_tokens")] == [(None, None), (None, None)]
    assert columns(db, "workspaces")[4] == "max_agents"
    assert [r[4] for r in rows(db, "workspaces")] == [None, None, None]
    assert rows(db, "audit_log") == []
    # The original was not touched by migrating the copy.
    assert version(original) == "0001"
    assert "audit_log" not in tables(original)
    check_seed_rows(original)

    # The code reads the migrated rows as it reads its own.
    async def read_back() -> None:
        engine = make_engine(url_of(db))
        try:
            async with make_sessions(engine)() as s:
                who = await authenticate(s, TOKEN, now_ms=T0 + 10)
                assert (who.tenant, who.principal.name, who.principal.role) == (
                    "acme", "alice", Role.ADMIN)
                states = {t.id: t.state for t in await list_tokens(s, tenant=None,
                                                                    now_ms=T0 + 10)}
                assert states == {1: "active", 2: "revoked"}
                grant = await tenant_grant(s, "hub-1", "acme")
                assert grant is not None and grant.workspaces is None
                assert grant.max_role_in("ws") == Role.OPERATOR
                assert await tenant_grant(s, "hub-1", "globex") is not None
        finally:
            await engine.dispose()

    asyncio.run(read_back())

    downgrade(url_of(db), "0001")
    assert version(db) == "0001"
    assert tables(db) == APP_TABLES | {"alembic_version"}
    assert "expires_at_ms" not in columns(db, "operator_tokens")
    assert "replaced_by_id" not in columns(db, "operator_tokens")
    assert "max_agents" not in columns(db, "workspaces")
    check_seed_rows(db)
    assert rows(db, "operator_tokens") == rows(original, "operator_tokens")

    downgrade(url_of(db), "base")
    assert tables(db) <= {"alembic_version"}  # Alembic keeps only its own (empty) table
    assert version(db) is None

    upgrade(url_of(db))
    assert version(db) == script_head()
    assert APP_TABLES | {"audit_log"} <= tables(db)
    for table in APP_TABLES | {"audit_log"}:
        assert rows(db, table) == [], table


def test_head_schema_matches_the_models(tmp_path: Path) -> None:
    db = tmp_path / "head.db"
    upgrade(url_of(db))
    engine = create_engine(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), models.Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


def test_postgres_every_step_up_and_down_and_head_matches_the_models() -> None:
    """The same migrations on PostgreSQL: each revision up one step at a time, the head
    schema equal to the models, then all the way down and up again."""
    url = asyncio.run(create_database(postgres_url()))
    try:
        revisions = [r.revision for r in reversed(list(
            ScriptDirectory(str(MIGRATIONS)).walk_revisions()))]
        for revision in revisions:
            upgrade(url, revision)

        async def diff_and_version() -> tuple[list[object], str]:
            engine = make_engine(url)
            try:
                async with engine.connect() as conn:
                    diff = await conn.run_sync(lambda c: compare_metadata(
                        MigrationContext.configure(c), models.Base.metadata))
                    version = (await conn.execute(
                        text("SELECT version_num FROM alembic_version"))).scalar_one()
            finally:
                await engine.dispose()
            return diff, version

        assert asyncio.run(diff_and_version()) == ([], script_head())
        downgrade(url, "base")
        upgrade(url)
        assert asyncio.run(diff_and_version()) == ([], script_head())
    finally:
        asyncio.run(drop_database(url))


# ---------------------------------------------------------------- whole-tenant grants


@pytest.fixture
async def sessions(engine):
    """Sessions on a database (each backend) with peer hub-1, tenant acme, workspace ws."""
    sessions = make_sessions(engine)
    async with sessions() as s, s.begin():
        await add_peer(s, name="hub-1",
                       public_key=Ed25519PrivateKey.generate().public_key()
                       .public_bytes_raw())
        await create_tenant(s, "acme")
        await create_workspace(s, "acme", "ws")
    return sessions


async def grant(sessions, workspace: str | None, role: Role = Role.OPERATOR) -> None:
    async with sessions() as s, s.begin():
        await add_grant(s, peer="hub-1", tenant="acme", workspace=workspace, max_role=role)


async def test_duplicate_whole_tenant_grant_is_refused(sessions) -> None:
    await grant(sessions, None, Role.OPERATOR)
    with pytest.raises(InvalidArgument, match="already holds a grant for tenant 'acme'"):
        await grant(sessions, None, Role.ADMIN)
    # A workspace grant beside the whole-tenant one is a different key.
    await grant(sessions, "ws", Role.ADMIN)
    with pytest.raises(InvalidArgument, match="workspace 'ws'"):
        await grant(sessions, "ws", Role.VIEWER)
    async with sessions() as s:
        assert await list_grants(s) == [("hub-1", "acme", "*", "operator"),
                                        ("hub-1", "acme", "ws", "admin")]


async def test_raw_duplicate_whole_tenant_grant_hits_the_unique_key(sessions) -> None:
    async with sessions() as s:
        peer_id = (await s.execute(select(models.Peer.id))).scalar_one()
        tenant_id = (await s.execute(select(models.Tenant.id))).scalar_one()
    row = {"peer_id": peer_id, "tenant_id": tenant_id, "workspace": ALL_WORKSPACES,
           "max_role": Role.OPERATOR.value, "created_at_ms": T0}

    async with sessions() as s, s.begin():
        await s.execute(insert(models.Grant).values(**row))
    with pytest.raises(IntegrityError, match=r"UNIQUE constraint failed: grants|grants_peer_id"):
        async with sessions() as s, s.begin():
            await s.execute(insert(models.Grant).values(**row))
    # NULL cannot stand in for "whole tenant" either: the column refuses it.
    with pytest.raises(IntegrityError, match=r"NOT NULL constraint failed: grants\.workspace"
                                             r'|null value in column "workspace"'):
        async with sessions() as s, s.begin():
            await s.execute(insert(models.Grant).values(**{**row, "workspace": None}))
    async with sessions() as s:
        assert (await s.execute(select(models.Grant.workspace))).scalars().all() == ["*"]


def test_null_would_not_have_collided() -> None:
    """Why '*' and not NULL: SQL unique keys treat every NULL as distinct."""
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.execute("CREATE TABLE g (peer_id INT, tenant_id INT, workspace TEXT, "
                     "UNIQUE (peer_id, tenant_id, workspace))")
        conn.execute("INSERT INTO g VALUES (1, 1, NULL)")
        conn.execute("INSERT INTO g VALUES (1, 1, NULL)")  # no error: the flaw
        assert conn.execute("SELECT count(*) FROM g").fetchone() == (2,)
        conn.execute("INSERT INTO g VALUES (1, 1, '*')")
        with pytest.raises(sqlite3.IntegrityError):
            conn.execute("INSERT INTO g VALUES (1, 1, '*')")
