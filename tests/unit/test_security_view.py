"""The security view: what a message is checked against is kept while the database's
security epoch stands, and a change made by anyone (here: another engine, as the CLI or
a second hub would be) acts on the next check. Both backends."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from shared import security_view
from shared.db.engine import make_engine, make_sessions
from shared.identity import Identity
from shared.peers import ACTIVE, DbKeyring, add_peer, change_peer_state
from shared.security_view import SecurityView
from shared.tenancy import create_tenant, create_workspace

WATCHED = importlib.import_module(
    "shared.db.migrations.versions.0006_security_epoch").WATCHED


@pytest.fixture
async def other(db_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """Sessions of a second engine on the same database: the CLI, or another hub."""
    eng = make_engine(db_url)
    try:
        yield make_sessions(eng)
    finally:
        await eng.dispose()


async def epoch(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT value FROM security_epoch"))).scalar_one())


async def run(engine: AsyncEngine, sql: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(text(sql))


async def test_every_change_to_a_watched_table_raises_the_epoch(engine: AsyncEngine) -> None:
    # Rows in every watched table, then an update and a delete of each (children first).
    inserts = {
        "tenants": "INSERT INTO tenants (id, slug, created_at_ms) VALUES (9, 't9', 1)",
        "workspaces": "INSERT INTO workspaces (id, tenant_id, slug, created_at_ms) "
                      "VALUES (9, 9, 'w9', 1)",
        "peers": "INSERT INTO peers (id, name, address, state, created_at_ms) "
                 "VALUES (9, 'p9', '', 'ACTIVE', 1)",
        "peer_keys": "INSERT INTO peer_keys (id, peer_id, key_id, public_key, state, "
                     "created_at_ms) VALUES (9, 9, 'k9', :key, 'ACTIVE', 1)",
        "grants": "INSERT INTO grants (id, peer_id, tenant_id, workspace, max_role, "
                  "created_at_ms) VALUES (9, 9, 9, '*', 1, 1)",
        "operator_tokens": "INSERT INTO operator_tokens (id, token_sha256, tenant_id, "
                           "principal, role, created_at_ms) VALUES (9, 'd9', 9, 'a', 1, 1)",
    }
    updates = {
        "tenants": "UPDATE tenants SET slug = 't10' WHERE id = 9",
        "workspaces": "UPDATE workspaces SET max_agents = 3 WHERE id = 9",
        "peers": "UPDATE peers SET state = 'SUSPENDED' WHERE id = 9",
        "peer_keys": "UPDATE peer_keys SET expires_at_ms = 5 WHERE id = 9",
        "grants": "UPDATE grants SET max_role = 2 WHERE id = 9",
        "operator_tokens": "UPDATE operator_tokens SET revoked_at_ms = 5 WHERE id = 9",
    }
    assert set(inserts) == set(updates) == set(WATCHED)
    for table, sql in inserts.items():
        before = await epoch(engine)
        async with engine.begin() as conn:
            await conn.execute(text(sql), {"key": bytes(32)} if ":key" in sql else {})
        assert await epoch(engine) > before, f"an INSERT into {table} left the epoch"
    for table, sql in updates.items():
        before = await epoch(engine)
        await run(engine, sql)
        assert await epoch(engine) > before, f"an UPDATE of {table} left the epoch"
    for table in ("operator_tokens", "grants", "peer_keys", "workspaces", "peers",
                  "tenants"):
        before = await epoch(engine)
        await run(engine, f"DELETE FROM {table} WHERE id = 9")
        assert await epoch(engine) > before, f"a DELETE from {table} left the epoch"


async def test_heartbeats_and_addresses_leave_the_epoch(engine: AsyncEngine) -> None:
    """A peer's liveness and address change all the time and are not checked against:
    changing them must not drop what every daemon keeps."""
    await run(engine, "INSERT INTO peers (id, name, address, state, created_at_ms) "
                      "VALUES (9, 'p9', '', 'ACTIVE', 1)")
    before = await epoch(engine)
    await run(engine, "UPDATE peers SET last_heartbeat_ms = 7, address = '1.2.3.4:5' "
                      "WHERE id = 9")
    assert await epoch(engine) == before


async def test_a_revocation_by_another_process_acts_on_the_next_check(
        sessions: async_sessionmaker[AsyncSession],
        other: async_sessionmaker[AsyncSession]) -> None:
    signer = Identity(name="spoke-1", private_key=Ed25519PrivateKey.generate())
    async with sessions() as session, session.begin():
        await add_peer(session, name="spoke-1", public_key=signer.public_key)
    view = SecurityView(sessions)
    keyring = DbKeyring(sessions, view=view)
    async with view.checked():
        first = await keyring.find_key(signer.key_id)
    async with view.checked():
        again = await keyring.find_key(signer.key_id)
    assert first is not None and again is not None and again.peer_active
    assert view.hits == 1, "the second message used what the first one read"
    async with other() as session, session.begin():
        await change_peer_state(session, "spoke-1", "suspend")
    async with view.checked():
        after = await keyring.find_key(signer.key_id)
    assert after is not None and not after.peer_active and after.peer_state == "SUSPENDED"
    assert view.hits == 1, "nothing kept from before the suspension was used"


async def test_what_was_read_before_a_change_is_not_kept(
        sessions: async_sessionmaker[AsyncSession],
        other: async_sessionmaker[AsyncSession]) -> None:
    """A lookup that read the old rows while another message saw the change must not
    store them: the next message would use them under the new epoch."""
    async with sessions() as session, session.begin():
        await create_tenant(session, "acme")
    view = SecurityView(sessions)
    loads = []

    async def load() -> str:
        loads.append(1)
        if len(loads) == 1:
            # Read the old state; meanwhile the change lands and another message checks.
            async with other() as session, session.begin():
                await create_workspace(session, "acme", "lab")
            await view.refresh()
        return f"read {len(loads)}"

    async with view.checked():
        assert await view.lookup("k", load) == "read 1"
    async with view.checked():
        assert await view.lookup("k", load) == "read 2", "the stale answer was kept"
    async with view.checked():
        assert await view.lookup("k", load) == "read 2"
    assert len(loads) == 2


async def test_a_lookup_outside_a_check_reads_the_epoch_itself(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    view = SecurityView(sessions)

    async def load() -> int:
        return 1

    for _ in range(3):
        await view.lookup("k", load)
    assert view.epoch_reads == 3
    async with view.checked():
        for _ in range(3):
            await view.lookup("k", load)
    assert view.epoch_reads == 4, "inside one check, one read of the epoch"


async def test_one_check_covers_a_request_for_a_bounded_time(
        sessions: async_sessionmaker[AsyncSession], monkeypatch: pytest.MonkeyPatch) -> None:
    """A long request (a bulk kill) checks again once its check is older than
    CHECK_LASTS_SECONDS."""
    monkeypatch.setattr(security_view, "CHECK_LASTS_SECONDS", -1.0)
    view = SecurityView(sessions)

    async def load() -> int:
        return 1

    async with view.checked():
        for _ in range(3):
            await view.lookup("k", load)
    assert view.epoch_reads == 4


async def test_what_is_kept_stays_bounded(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Unknown key ids are kept too; a flood of made-up ones must not grow memory."""
    view = SecurityView(sessions, max_entries=5)

    async def load() -> None:
        return None

    async with view.checked():
        for n in range(50):
            await view.lookup(("key", str(n)), load)
    assert len(view._entries) <= 5


async def test_a_key_added_after_it_was_looked_up_unknown_is_found(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    """An unknown key id is kept as unknown only until the key is added."""
    signer = Identity(name="hub-2", private_key=Ed25519PrivateKey.generate())
    view = SecurityView(sessions)
    keyring = DbKeyring(sessions, view=view)
    async with view.checked():
        assert await keyring.find_key(signer.key_id) is None
    async with sessions() as session, session.begin():
        await add_peer(session, name="hub-2", public_key=signer.public_key, state=ACTIVE)
    async with view.checked():
        found = await keyring.find_key(signer.key_id)
    assert found is not None and found.peer_active, "an unknown key, once added, is found"
