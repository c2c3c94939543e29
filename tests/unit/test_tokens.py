"""Operator tokens (hub.tokens) over a real migrated SQLite database, with an explicit clock."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path

import pytest
from sqlalchemy import event, func, select, text

from hub.tokens import (
    MAX_ACTIVE,
    TOKEN_PREFIX,
    Issued,
    TokenExpired,
    TokenInfo,
    authenticate,
    create_token,
    deactivate_token,
    list_tokens,
    revoke_token,
    rotate_token,
    token_digest,
)
from shared.db import models
from shared.db.engine import make_engine, make_sessions
from shared.errors import InvalidArgument, NotFound, Unauthenticated
from shared.scope import Principal, Role
from shared.tenancy import create_tenant

T0 = 1_700_000_000_000
HOUR = 3600 * 1000


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture
async def db_url(db_url: str) -> str:
    """This test's database (on each backend), with tenants acme and globex."""
    engine = make_engine(db_url)
    try:
        async with make_sessions(engine)() as s, s.begin():
            await create_tenant(s, "acme")
            await create_tenant(s, "globex")
    finally:
        await engine.dispose()
    return db_url


async def create(sessions, principal: str = "alice", *, tenant: str = "acme",
                 role: Role = Role.OPERATOR, at: int = T0) -> Issued:
    async with sessions() as s, s.begin():
        return await create_token(s, tenant=tenant, principal=principal, role=role, now_ms=at)


async def rotate(sessions, token_id: int, *, at: int, grace_hours: int = 24) -> Issued:
    async with sessions() as s, s.begin():
        return await rotate_token(s, token_id=token_id, grace_hours=grace_hours, now_ms=at)


async def revoke(sessions, token_id: int, *, at: int) -> None:
    async with sessions() as s, s.begin():
        await revoke_token(s, token_id=token_id, now_ms=at)


async def auth(sessions, token: str, *, at: int):
    async with sessions() as s:
        return await authenticate(s, token, now_ms=at)


async def listing(sessions, *, at: int, tenant: str | None = None) -> dict[int, TokenInfo]:
    async with sessions() as s:
        return {t.id: t for t in await list_tokens(s, tenant=tenant, now_ms=at)}


async def works(sessions, token: str, *, at: int) -> bool:
    try:
        await auth(sessions, token, at=at)
    except Unauthenticated:
        return False
    return True


async def working_ids(sessions, *, at: int, principal: str = "alice",
                      tenant: str = "acme") -> set[int]:
    """Tokens of a principal that list_tokens calls working (active or in grace)."""
    rows = await listing(sessions, at=at, tenant=tenant)
    return {i for i, t in rows.items()
            if t.principal == principal and t.state in ("active", "expiring")}


async def token_rows(sessions, principal: str = "alice") -> list[models.OperatorToken]:
    async with sessions() as s:
        return list((await s.execute(
            select(models.OperatorToken).where(models.OperatorToken.principal == principal)
            .order_by(models.OperatorToken.id))).scalars())


# ---------------------------------------------------------------- create / authenticate


async def test_create_returns_prefixed_token_that_authenticates(sessions) -> None:
    issued = await create(sessions, "alice", role=Role.OPERATOR)
    assert issued.token.startswith(TOKEN_PREFIX)
    assert len(issued.token) >= len(TOKEN_PREFIX) + 43  # 32 random bytes, base64url
    assert issued.retired == ()

    who = await auth(sessions, issued.token, at=T0 + 1)
    assert who.tenant == "acme"
    assert who.principal == Principal(name="alice", role=Role.OPERATOR)
    assert who.token_id == issued.id

    admin = await create(sessions, "root", tenant="globex", role=Role.ADMIN)
    who = await auth(sessions, admin.token, at=T0 + 1)
    assert (who.tenant, who.principal.name, who.principal.role) == ("globex", "root",
                                                                    Role.ADMIN)
    assert admin.token != issued.token


async def test_only_the_sha256_is_stored(backend, sessions, engine, db_url: str) -> None:
    issued = await create(sessions, "alice")
    (row,) = await token_rows(sessions)
    digest = hashlib.sha256(issued.token.encode()).hexdigest()
    assert row.token_sha256 == digest == token_digest(issued.token)

    if backend == "sqlite":
        await engine.dispose()  # close every connection, so the files hold everything
        db_path = Path(db_url.removeprefix("sqlite+aiosqlite:///"))
        stored = b"".join(p.read_bytes() for p in db_path.parent.glob("s.db*"))
    else:  # every column of every row of every table, as text
        async with engine.connect() as conn:
            tables = list((await conn.execute(text(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))).scalars())
            stored = b""
            for table in tables:
                rows = (await conn.execute(text(f'SELECT * FROM "{table}"'))).all()
                stored += str(rows).encode()
    assert digest.encode() in stored  # we are looking at the right bytes...
    assert issued.token.encode() not in stored  # ...and the secret is not among them
    assert issued.token[len(TOKEN_PREFIX):].encode() not in stored


@pytest.mark.parametrize("token", ["", "not-a-token", "fwt_" + "x" * 43, "fwt_" + "a" * 300,
                                   "FWT_abc"])
async def test_authenticate_refuses_unknown_or_malformed(sessions, token: str) -> None:
    await create(sessions, "alice")
    with pytest.raises(Unauthenticated) as exc:
        await auth(sessions, token, at=T0)
    assert not isinstance(exc.value, TokenExpired)


async def test_create_checks_tenant_and_principal(sessions) -> None:
    with pytest.raises(NotFound, match="tenant 'nope' not found"):
        await create(sessions, "alice", tenant="nope")
    with pytest.raises(InvalidArgument, match="principal"):
        await create(sessions, "bad name!")
    assert await token_rows(sessions) == []


# ---------------------------------------------------------------- at most three


async def test_fourth_token_retires_the_oldest(sessions) -> None:
    assert MAX_ACTIVE == 3
    alice = [await create(sessions, "alice", at=T0 + i) for i in range(3)]
    bob = [await create(sessions, "bob", at=T0 + i) for i in range(3)]
    alice_globex = await create(sessions, "alice", tenant="globex", at=T0)

    fourth = await create(sessions, "alice", at=T0 + 10)
    assert fourth.retired == (alice[0].id,)

    with pytest.raises(Unauthenticated):
        await auth(sessions, alice[0].token, at=T0 + 11)
    for tok in (alice[1], alice[2], fourth):
        assert (await auth(sessions, tok.token, at=T0 + 11)).token_id == tok.id
    # Other principals, and the same name in another tenant, are not touched.
    for tok in (*bob, alice_globex):
        assert (await auth(sessions, tok.token, at=T0 + 11)).token_id == tok.id

    rows = await listing(sessions, at=T0 + 11)
    assert rows[alice[0].id].state == "revoked"
    assert await working_ids(sessions, at=T0 + 11) == {alice[1].id, alice[2].id, fourth.id}

    fifth = await create(sessions, "alice", at=T0 + 20)
    assert fifth.retired == (alice[1].id,)
    assert await working_ids(sessions, at=T0 + 21) == {alice[2].id, fourth.id, fifth.id}


async def test_revoked_tokens_do_not_count_toward_the_limit(sessions) -> None:
    a, b, c = [await create(sessions, "alice", at=T0 + i) for i in range(3)]
    await revoke(sessions, b.id, at=T0 + 5)
    d = await create(sessions, "alice", at=T0 + 10)
    assert d.retired == ()
    assert await working_ids(sessions, at=T0 + 11) == {a.id, c.id, d.id}


# ---------------------------------------------------------------- rotate


async def test_rotate_new_works_old_works_until_grace_end(sessions) -> None:
    old = await create(sessions, "alice", role=Role.ADMIN, at=T0)
    t1 = T0 + 5 * 60 * 1000
    new = await rotate(sessions, old.id, at=t1, grace_hours=2)
    grace_end = t1 + 2 * HOUR
    assert new.id != old.id and new.token != old.token
    assert new.retired == ()

    who = await auth(sessions, new.token, at=t1)
    assert (who.tenant, who.principal, who.token_id) == (
        "acme", Principal("alice", Role.ADMIN), new.id)
    assert (await auth(sessions, new.token, at=grace_end + 10 * HOUR)).token_id == new.id

    assert (await auth(sessions, old.token, at=t1)).token_id == old.id
    assert (await auth(sessions, old.token, at=grace_end - 1)).token_id == old.id
    for at in (grace_end, grace_end + 1, grace_end + 100 * HOUR):
        with pytest.raises(TokenExpired) as exc:
            await auth(sessions, old.token, at=at)
        assert exc.value.token_id == old.id
        assert str(new.id) in exc.value.message  # names the replacement
    assert issubclass(TokenExpired, Unauthenticated)

    during = await listing(sessions, at=grace_end - 1)
    assert during[old.id].state == "expiring"
    assert during[old.id].expires_at_ms == grace_end
    assert during[old.id].replaced_by_id == new.id
    assert during[new.id].state == "active"
    assert during[new.id].replaced_by_id is None
    assert during[new.id].role == "admin"
    after = await listing(sessions, at=grace_end)
    assert after[old.id].state == "expired"
    assert after[old.id].replaced_by_id == new.id


@pytest.mark.parametrize("grace", [0, -1, 721, 10_000])
async def test_rotate_refuses_grace_out_of_range(sessions, grace: int) -> None:
    tok = await create(sessions, "alice")
    with pytest.raises(InvalidArgument, match="1 to 720"):
        await rotate(sessions, tok.id, at=T0 + 1, grace_hours=grace)
    rows = await listing(sessions, at=T0 + 1)
    assert list(rows) == [tok.id]
    assert (rows[tok.id].state, rows[tok.id].replaced_by_id) == ("active", None)


@pytest.mark.parametrize("grace", [1, 720])
async def test_rotate_accepts_grace_bounds(sessions, grace: int) -> None:
    tok = await create(sessions, "alice")
    new = await rotate(sessions, tok.id, at=T0 + 1, grace_hours=grace)
    rows = await listing(sessions, at=T0 + 1)
    assert rows[tok.id].expires_at_ms == T0 + 1 + grace * HOUR
    assert rows[tok.id].replaced_by_id == new.id


async def test_rotate_refuses_rotated_revoked_expired_or_unknown(sessions) -> None:
    a = await create(sessions, "alice", at=T0)
    b = await create(sessions, "bob", at=T0)
    c = await create(sessions, "carol", at=T0)
    a2 = await rotate(sessions, a.id, at=T0 + 1, grace_hours=1)
    await revoke(sessions, b.id, at=T0 + 1)
    async with sessions() as s:
        before = (await s.execute(select(func.count()).select_from(models.OperatorToken))
                  ).scalar_one()

    with pytest.raises(NotFound, match=f"token {a.id} "):
        await rotate(sessions, a.id, at=T0 + 2)  # already rotated, still in grace
    with pytest.raises(NotFound):
        await rotate(sessions, a.id, at=T0 + 2 * HOUR)  # rotated and past its grace
    with pytest.raises(NotFound, match=f"token {b.id} "):
        await rotate(sessions, b.id, at=T0 + 2)  # revoked
    with pytest.raises(NotFound, match="token 9999 "):
        await rotate(sessions, 9999, at=T0 + 2)  # unknown

    rows = await listing(sessions, at=T0 + 2)
    assert len(rows) == before  # no refusal issued a token
    assert rows[a.id].replaced_by_id == a2.id  # nor re-pointed the chain
    assert rows[b.id].replaced_by_id is None
    # The replacement can itself be rotated.
    a3 = await rotate(sessions, a2.id, at=T0 + 3)
    assert (await listing(sessions, at=T0 + 3))[a2.id].replaced_by_id == a3.id
    assert (await auth(sessions, c.token, at=T0 + 3)).token_id == c.id


async def test_list_tokens_states_and_tenant_filter(sessions) -> None:
    active = await create(sessions, "p-active", at=T0)
    expiring = await create(sessions, "p-expiring", at=T0)
    expired = await create(sessions, "p-expired", at=T0)
    revoked = await create(sessions, "p-revoked", at=T0)
    other = await create(sessions, "p-other", tenant="globex", role=Role.VIEWER, at=T0)
    now = T0 + 10 * HOUR
    exp_new = await rotate(sessions, expiring.id, at=now - HOUR, grace_hours=2)
    gone_new = await rotate(sessions, expired.id, at=now - 3 * HOUR, grace_hours=1)
    await revoke(sessions, revoked.id, at=now - 1)

    rows = await listing(sessions, at=now)
    assert {i: t.state for i, t in rows.items()} == {
        active.id: "active", expiring.id: "expiring", expired.id: "expired",
        revoked.id: "revoked", other.id: "active", exp_new.id: "active",
        gone_new.id: "active"}
    assert rows[expiring.id].replaced_by_id == exp_new.id
    assert rows[expired.id].replaced_by_id == gone_new.id
    assert rows[expired.id].expires_at_ms == now - 2 * HOUR
    assert rows[revoked.id].replaced_by_id is None
    assert rows[other.id].tenant == "globex" and rows[other.id].role == "viewer"
    assert list(rows) == sorted(rows)  # ordered by id

    assert set(await listing(sessions, at=now, tenant="globex")) == {other.id}
    assert other.id not in await listing(sessions, at=now, tenant="acme")
    assert await listing(sessions, at=now, tenant="nope") == {}


async def test_rotating_a_newer_token_at_capacity_keeps_three_working(sessions) -> None:
    a, b, c = [await create(sessions, "alice", at=T0 + i) for i in range(3)]
    t1 = T0 + 100
    d = await rotate(sessions, b.id, at=t1, grace_hours=1)
    assert d.retired == (a.id,)
    assert await working_ids(sessions, at=t1 + 1) == {b.id, c.id, d.id}
    assert (await auth(sessions, b.token, at=t1 + HOUR - 1)).token_id == b.id
    with pytest.raises(Unauthenticated):
        await auth(sessions, a.token, at=t1 + 1)


async def test_rotating_the_oldest_at_capacity_keeps_its_grace(sessions) -> None:
    a, *_ = [await create(sessions, "alice", at=T0 + i) for i in range(3)]
    t1 = T0 + 100
    d = await rotate(sessions, a.id, at=t1, grace_hours=24)
    # The rotate contract: "the old one keeps working for grace_hours".
    assert a.id not in d.retired and len(d.retired) == 1
    assert (await auth(sessions, a.token, at=t1 + 1)).token_id == a.id
    assert len(await working_ids(sessions, at=t1 + 1)) <= MAX_ACTIVE
    # The oldest *other* token made room instead.
    assert d.retired[0] != a.id


# ---------------------------------------------------------------- revoke / deactivate


async def test_revoke_stops_a_token_at_once(sessions) -> None:
    a = await create(sessions, "alice", at=T0)
    b = await create(sessions, "alice", at=T0 + 1)
    assert (await auth(sessions, a.token, at=T0 + 5)).token_id == a.id
    await revoke(sessions, a.id, at=T0 + 5)
    with pytest.raises(Unauthenticated) as exc:
        await auth(sessions, a.token, at=T0 + 5)
    assert not isinstance(exc.value, TokenExpired)
    assert (await listing(sessions, at=T0 + 5))[a.id].state == "revoked"
    assert (await auth(sessions, b.token, at=T0 + 5)).token_id == b.id

    with pytest.raises(NotFound, match="already revoked"):
        await revoke(sessions, a.id, at=T0 + 6)
    with pytest.raises(NotFound):
        await revoke(sessions, 9999, at=T0 + 6)
    (row_a, _) = await token_rows(sessions)
    assert row_a.revoked_at_ms == T0 + 5  # the second revoke did not move the time


async def test_revoking_a_token_in_grace_stops_it(sessions) -> None:
    a = await create(sessions, "alice", at=T0)
    new = await rotate(sessions, a.id, at=T0 + 1, grace_hours=24)
    await revoke(sessions, a.id, at=T0 + 2)
    assert not await works(sessions, a.token, at=T0 + 3)
    assert await works(sessions, new.token, at=T0 + 3)
    assert (await listing(sessions, at=T0 + 3))[a.id].state == "revoked"


async def test_deactivate_after_token_expired_marks_it_revoked(sessions) -> None:
    a = await create(sessions, "alice", at=T0)
    new = await rotate(sessions, a.id, at=T0, grace_hours=1)
    grace_end = T0 + HOUR
    with pytest.raises(TokenExpired) as exc:
        await auth(sessions, a.token, at=grace_end)
    assert (await listing(sessions, at=grace_end))[a.id].state == "expired"

    async with sessions() as s, s.begin():
        await deactivate_token(s, exc.value.token_id, grace_end)
    rows = await listing(sessions, at=grace_end)
    assert rows[a.id].state == "revoked"
    assert rows[a.id].replaced_by_id == new.id
    (row_a, _) = await token_rows(sessions)
    assert row_a.revoked_at_ms == grace_end
    with pytest.raises(Unauthenticated) as again:
        await auth(sessions, a.token, at=grace_end)
    assert not isinstance(again.value, TokenExpired)
    # Deactivating again is a no-op (the service may race with itself), not an error.
    async with sessions() as s, s.begin():
        await deactivate_token(s, a.id, grace_end + 5)
    (row_a, _) = await token_rows(sessions)
    assert row_a.revoked_at_ms == grace_end
    assert await works(sessions, new.token, at=grace_end)


# ---------------------------------------------------------------- concurrency


async def assert_chain(sessions, old: Issued, winner: Issued, before: set[int], *,
                       at: int) -> None:
    """old was rotated exactly once, to winner, and nothing else was issued."""
    rows = await token_rows(sessions)
    ids = {r.id for r in rows}
    by_id = {r.id: r for r in rows}
    assert by_id[old.id].replaced_by_id == winner.id
    assert winner.id in ids
    assert ids - before == {winner.id}  # exactly one new token for the principal
    assert [r.id for r in rows if r.replaced_by_id is not None] == [old.id]
    assert 0 not in {r.replaced_by_id for r in rows}  # no half-done claim left
    assert len(await working_ids(sessions, at=at)) <= MAX_ACTIVE
    assert await works(sessions, winner.token, at=at)
    assert await works(sessions, old.token, at=at)  # in its grace


@pytest.mark.parametrize("n", [2, 5])
async def test_concurrent_rotations_exactly_one_wins(sessions, n: int) -> None:
    old = await create(sessions, "alice", at=T0)
    other = await create(sessions, "alice", at=T0 + 1)
    t1 = T0 + 100
    results = await asyncio.gather(*(rotate(sessions, old.id, at=t1) for _ in range(n)),
                                   return_exceptions=True)
    wins = [r for r in results if isinstance(r, Issued)]
    losses = [r for r in results if not isinstance(r, Issued)]
    assert len(wins) == 1
    # Observed: every loser waits on the first's write (SQLite's write lock with its
    # busy_timeout; PostgreSQL's row lock), then finds the claim taken: NotFound, never
    # a database-busy OperationalError.
    assert [type(e) for e in losses] == [NotFound] * (n - 1)
    await assert_chain(sessions, old, wins[0], {old.id, other.id}, at=t1 + 1)


async def test_second_rotation_waits_for_the_first_claim(engine, sessions) -> None:
    """Deterministic interleaving: the first rotation holds its transaction open while
    the second starts; the second cannot finish until the first commits, and then finds
    the token already rotated."""
    old = await create(sessions, "alice", at=T0)
    t1 = T0 + 100
    second_claiming = asyncio.Event()

    def spy(conn, cursor, statement, params, context, executemany) -> None:
        # Its first statement that can wait: the tenant's row lock on PostgreSQL (no
        # such lock on SQLite), else the claim.
        if (statement.lstrip().startswith("UPDATE operator_tokens")
                or statement.rstrip().endswith("FOR UPDATE")):
            second_claiming.set()

    async with sessions() as first, first.begin():
        winner = await rotate_token(first, token_id=old.id, grace_hours=24, now_ms=t1)
        event.listen(engine.sync_engine, "before_cursor_execute", spy)
        try:
            second = asyncio.create_task(rotate(sessions, old.id, at=t1))
            await asyncio.wait_for(second_claiming.wait(), timeout=5)
            for _ in range(20):
                await asyncio.sleep(0)
            assert not second.done()  # blocked on the first's write (or row) lock
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", spy)
    with pytest.raises(NotFound):
        await asyncio.wait_for(second, timeout=15)
    await assert_chain(sessions, old, winner, {old.id}, at=t1 + 1)


def test_concurrent_rotations_from_threads_exactly_one_wins(db_url: str) -> None:
    """Each rotation in its own OS thread, event loop and engine (as separate processes
    sharing the database would be)."""
    n = 3
    url = db_url
    t1 = T0 + 100

    async def setup() -> tuple[Issued, Issued]:
        eng = make_engine(url)
        try:
            s = make_sessions(eng)
            return await create(s, "alice", at=T0), await create(s, "alice", at=T0 + 1)
        finally:
            await eng.dispose()

    old, other = asyncio.run(setup())
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    async def one(i: int) -> None:
        eng = make_engine(url)
        try:
            async with eng.connect():
                pass  # connect (and set pragmas) before the race; the pool keeps it
            async with make_sessions(eng)() as s:
                await asyncio.to_thread(barrier.wait, 10)
                async with s.begin():
                    results[i] = await rotate_token(s, token_id=old.id, grace_hours=24,
                                                    now_ms=t1)
        except Exception as err:
            results[i] = err
        finally:
            await eng.dispose()

    threads = [threading.Thread(target=asyncio.run, args=(one(i),)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)

    wins = [r for r in results if isinstance(r, Issued)]
    losses = [r for r in results if not isinstance(r, Issued)]
    assert len(wins) == 1, results
    assert [type(e) for e in losses] == [NotFound] * (n - 1), results

    async def check() -> None:
        eng = make_engine(url)
        try:
            await assert_chain(make_sessions(eng), old, wins[0], {old.id, other.id},
                               at=t1 + 1)
        finally:
            await eng.dispose()

    asyncio.run(check())


async def test_concurrent_creates_keep_at_most_three_working(sessions) -> None:
    issued = await asyncio.gather(*(create(sessions, "alice", at=T0) for _ in range(8)))
    good = [i for i in issued if await works(sessions, i.token, at=T0 + 1)]
    assert len(good) == MAX_ACTIVE
    retired = {r for i in issued for r in i.retired}
    assert len(retired) == 8 - MAX_ACTIVE
    assert retired.isdisjoint(i.id for i in good)
    assert await working_ids(sessions, at=T0 + 1) == {i.id for i in good}


async def test_mixed_concurrent_rotations_and_creates_keep_at_most_three(sessions) -> None:
    a, b, c = [await create(sessions, "alice", at=T0 + i) for i in range(3)]
    t1 = T0 + 100
    ops = [rotate(sessions, c.id, at=t1) for _ in range(3)]
    ops += [create(sessions, "alice", at=t1) for _ in range(2)]
    results = await asyncio.gather(*ops, return_exceptions=True)
    rotations, creations = results[:3], results[3:]
    assert all(isinstance(r, Issued) for r in creations), creations
    wins = [r for r in rotations if isinstance(r, Issued)]
    assert len(wins) <= 1
    assert all(type(r) is NotFound for r in rotations if not isinstance(r, Issued))

    every = [a, b, c, *creations, *wins]
    good = {i.id for i in every if await works(sessions, i.token, at=t1 + 1)}
    assert len(good) == MAX_ACTIVE
    assert await working_ids(sessions, at=t1 + 1) == good
    rows = {r.id: r for r in await token_rows(sessions)}
    assert len(rows) == 3 + 2 + len(wins)
    if wins:
        assert rows[c.id].replaced_by_id == wins[0].id
    assert 0 not in {r.replaced_by_id for r in rows.values()}
