"""The hash-chained audit trail (shared.audit) and the `audit` CLI commands."""

from __future__ import annotations

import asyncio
import itertools
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import event, func, select, text
from sqlalchemy.exc import IntegrityError

from shared.audit import (
    ALLOWED,
    GENESIS,
    REFUSED,
    AuditEntry,
    AuditTrail,
    append_audit,
    load_records,
    record_hash,
    verify_chain,
)
from shared.cli import build_cli
from shared.db import models
from tests.integration.helpers import eventually

T0 = 1_700_000_000_000
FIELDS = ("action", "outcome", "tenant", "workspace", "principal", "peer", "target",
          "message_id", "reason")


# ---------------------------------------------------------------- fixtures and helpers


def entry(i: int) -> AuditEntry:
    return AuditEntry(action=f"test.action{i}", outcome=ALLOWED if i % 2 else REFUSED,
                      tenant="acme", workspace="ws", principal="alice", peer="spoke-1",
                      target=f"agent-{i}", message_id=f"m{i}", reason=f"reason {i}")


async def append_n(sessions, n: int) -> list[models.AuditRecord]:
    out = []
    for i in range(1, n + 1):
        async with sessions() as s, s.begin():
            out.append(await append_audit(s, entry(i), at_ms=T0 + i))
    return out


async def load(sessions, tenant: str | None = None) -> list[models.AuditRecord]:
    async with sessions() as s:
        return await load_records(s, tenant)


async def tamper(engine, *statements: str) -> None:
    """Change the database behind the application's back, as an intruder would."""
    async with engine.begin() as conn:
        for sql in statements:
            await conn.execute(text(sql))


def tamper_file(db: Path, *statements: str) -> None:
    """tamper, on an instance's SQLite file (the CLI tests)."""
    with closing(sqlite3.connect(db)) as conn, conn:
        for sql in statements:
            conn.execute(sql)


# ---------------------------------------------------------------- the chain


async def test_append_builds_a_linked_chain(sessions) -> None:
    appended = await append_n(sessions, 5)
    assert [r.seq for r in appended] == [1, 2, 3, 4, 5]
    records = await load(sessions)
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert records[0].prev_hash == GENESIS == "0" * 64
    for before, rec in itertools.pairwise(records):
        assert rec.prev_hash == before.hash
    for i, rec in enumerate(records, start=1):
        assert rec.at_ms == T0 + i
        assert {f: getattr(rec, f) for f in FIELDS} == vars(entry(i))
        assert rec.hash == record_hash(rec.seq, rec.at_ms, vars(entry(i)), rec.prev_hash)
    assert len({r.hash for r in records}) == 5
    assert verify_chain(records) is None
    assert verify_chain([]) is None


async def test_hash_covers_every_field_and_position() -> None:
    fields = vars(entry(1))
    base = record_hash(1, T0, fields, GENESIS)
    assert len(base) == 64
    assert record_hash(1, T0, dict(fields), GENESIS) == base  # deterministic
    assert record_hash(2, T0, fields, GENESIS) != base
    assert record_hash(1, T0 + 1, fields, GENESIS) != base
    assert record_hash(1, T0, fields, "1" * 64) != base
    for name in FIELDS:
        assert record_hash(1, T0, {**fields, name: fields[name] + "x"}, GENESIS) != base


async def test_long_fields_are_cut_and_still_verify(sessions) -> None:
    async with sessions() as s, s.begin():
        await append_audit(s, AuditEntry(action="a", outcome=ALLOWED, reason="é" * 5000))
    (rec,) = await load(sessions)
    assert rec.reason == "é" * 2000
    assert verify_chain([rec]) is None


async def test_load_records_filters_by_tenant(sessions) -> None:
    async with sessions() as s, s.begin():
        for tenant in ("acme", "globex", "acme"):
            await append_audit(s, AuditEntry(action="x", outcome=ALLOWED, tenant=tenant))
    assert [r.seq for r in await load(sessions, "acme")] == [1, 3]
    assert [r.seq for r in await load(sessions, "globex")] == [2]
    assert verify_chain(await load(sessions)) is None


# ---------------------------------------------------------------- tampering


@pytest.mark.parametrize(("column", "value"), [
    ("reason", "'nothing to see'"), ("action", "'test.other'"), ("outcome", "'hidden'"),
    ("tenant", "'globex'"), ("principal", "'mallory'"), ("at_ms", "at_ms + 1")])
async def test_edited_field_names_the_record(sessions, engine, column: str,
                                             value: str) -> None:
    await append_n(sessions, 5)
    await tamper(engine, f"UPDATE audit_log SET {column} = {value} WHERE seq = 3")
    broken = verify_chain(await load(sessions))
    assert broken is not None
    assert broken.seq == 3
    assert "edited" in broken.problem


async def test_deleted_record_names_the_one_after_it(sessions, engine) -> None:
    await append_n(sessions, 5)
    await tamper(engine, "DELETE FROM audit_log WHERE seq = 2")
    broken = verify_chain(await load(sessions))
    assert broken is not None
    assert broken.seq == 3
    assert "expected record 2" in broken.problem


async def test_deleted_first_record_is_named(sessions, engine) -> None:
    await append_n(sessions, 3)
    await tamper(engine, "DELETE FROM audit_log WHERE seq = 1")
    broken = verify_chain(await load(sessions))
    assert broken is not None and broken.seq == 2


async def test_deleted_and_renumbered_record_is_named(sessions, engine) -> None:
    """Closing the gap in seq does not hide a removal: the links still break."""
    await append_n(sessions, 4)
    await tamper(engine, "DELETE FROM audit_log WHERE seq = 2",
           "UPDATE audit_log SET seq = seq - 1 WHERE seq > 2")
    broken = verify_chain(await load(sessions))
    assert broken is not None
    assert broken.seq == 2
    assert "previous-hash" in broken.problem


async def test_tail_truncation_is_invisible_to_verify_chain_but_moves_the_head(
        sessions, engine) -> None:
    """A known limit of an unanchored chain: dropping the newest records leaves a valid
    chain. Only the head hash (printed by `audit verify`) shows it."""
    records = await append_n(sessions, 4)
    await tamper(engine, "DELETE FROM audit_log WHERE seq = 4")
    left = await load(sessions)
    assert verify_chain(left) is None
    assert left[-1].hash != records[-1].hash


async def test_reordered_records_are_named(sessions, engine) -> None:
    """Swap the whole contents (hashes included) of records 2 and 3."""
    await append_n(sessions, 5)
    await tamper(engine,
           "UPDATE audit_log SET seq = -2 WHERE seq = 2",
           "UPDATE audit_log SET seq = 2 WHERE seq = 3",
           "UPDATE audit_log SET seq = 3 WHERE seq = -2")
    records = await load(sessions)
    assert [r.action for r in records[:4]] == [
        "test.action1", "test.action3", "test.action2", "test.action4"]
    broken = verify_chain(records)
    assert broken is not None
    assert broken.seq == 2
    assert "previous-hash" in broken.problem


async def test_edited_hash_is_named(sessions, engine) -> None:
    await append_n(sessions, 5)
    await tamper(engine, f"UPDATE audit_log SET hash = '{'f' * 64}' WHERE seq = 2")
    broken = verify_chain(await load(sessions))
    assert broken is not None
    assert broken.seq == 2
    assert "edited" in broken.problem


async def test_edit_with_recomputed_hash_breaks_the_next_link(sessions, engine) -> None:
    """An intruder who rehashes the edited record is caught by the record after it."""
    records = await append_n(sessions, 5)
    rec = records[1]
    forged = {**{f: getattr(rec, f) for f in FIELDS}, "reason": "nothing happened"}
    new_hash = record_hash(rec.seq, rec.at_ms, forged, rec.prev_hash)
    await tamper(engine, "UPDATE audit_log SET reason = 'nothing happened', "
                    f"hash = '{new_hash}' WHERE seq = 2")
    broken = verify_chain(await load(sessions))
    assert broken is not None
    assert broken.seq == 3
    assert "previous-hash" in broken.problem


async def test_edited_genesis_link_is_named(sessions, engine) -> None:
    await append_n(sessions, 2)
    await tamper(engine, f"UPDATE audit_log SET prev_hash = '{'1' * 64}' WHERE seq = 1")
    broken = verify_chain(await load(sessions))
    assert broken is not None and broken.seq == 1


# ---------------------------------------------------------------- concurrency and forks


async def test_audit_trail_concurrent_records_keep_one_chain(sessions) -> None:
    trail = AuditTrail(sessions)
    await asyncio.gather(*(trail.record(entry(i)) for i in range(1, 51)))
    records = await load(sessions)
    assert [r.seq for r in records] == list(range(1, 51))
    assert sorted(r.action for r in records) == sorted(f"test.action{i}"
                                                       for i in range(1, 51))
    assert verify_chain(records) is None


async def test_audit_trail_transaction_commits_change_and_record_together(sessions) -> None:
    trail = AuditTrail(sessions)
    with pytest.raises(RuntimeError):
        async with trail.transaction() as s:
            s.add(models.Tenant(slug="acme", created_at_ms=T0))
            await append_audit(s, entry(1))
            raise RuntimeError("change failed")
    async with trail.reader() as s:
        assert (await s.execute(select(func.count()).select_from(models.Tenant))
                ).scalar_one() == 0
    assert await load(sessions) == []
    async with trail.transaction() as s:
        s.add(models.Tenant(slug="acme", created_at_ms=T0))
        await append_audit(s, entry(1))
    assert [r.seq for r in await load(sessions)] == [1]


async def test_second_record_with_an_existing_prev_hash_is_refused(sessions) -> None:
    records = await append_n(sessions, 3)
    fields = vars(entry(99))
    fork = models.AuditRecord(seq=4, at_ms=T0 + 99, prev_hash=records[1].prev_hash,
                              hash=record_hash(4, T0 + 99, fields, records[1].prev_hash),
                              **fields)
    with pytest.raises(IntegrityError, match=r"audit_log[._]prev_hash"):
        async with sessions() as s, s.begin():
            s.add(fork)
    after = await load(sessions)
    assert [r.seq for r in after] == [1, 2, 3]
    assert verify_chain(after) is None


async def test_racing_appends_without_the_lock_cannot_fork(backend, engine, sessions) -> None:
    """Two transactions append at once without AuditTrail's in-process lock. SQLite: the
    second reads the same tail and its insert is refused by the database rather than
    forking the chain. PostgreSQL (processes sharing it): the second waits for the
    chain's lock, then appends after the first."""
    await append_n(sessions, 2)
    second_waiting = asyncio.Event()

    def spy(conn, cursor, statement, params, context, executemany) -> None:
        if statement.lstrip().startswith("INSERT INTO audit_log"):
            second_waiting.set()

    async def second() -> None:
        async with sessions() as s, s.begin():
            await append_audit(s, entry(4), at_ms=T0 + 4)

    async def someone_waits_for_the_lock() -> bool:
        async with sessions() as s:
            return bool((await s.execute(text(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                "AND NOT granted"))).scalar_one())

    async with sessions() as first, first.begin():
        await append_audit(first, entry(3), at_ms=T0 + 3)  # holds the write lock
        event.listen(engine.sync_engine, "before_cursor_execute", spy)
        try:
            task = asyncio.create_task(second())
            if backend == "postgresql":
                await eventually(someone_waits_for_the_lock, 10, "the second to wait")
                second_waiting.set()
            # SQLite: the second has read the same tail (seq 2), inserts seq 3.
            await asyncio.wait_for(second_waiting.wait(), timeout=10)
            assert not task.done()
        finally:
            event.remove(engine.sync_engine, "before_cursor_execute", spy)
    expected = ["test.action1", "test.action2", "test.action3"]
    if backend == "sqlite":
        with pytest.raises(IntegrityError, match="UNIQUE constraint failed: audit_log"):
            await asyncio.wait_for(task, timeout=15)
    else:
        await asyncio.wait_for(task, timeout=15)
        expected.append("test.action4")
    records = await load(sessions)
    assert [r.action for r in records] == expected
    assert verify_chain(records) is None


# ---------------------------------------------------------------- the CLI


@pytest.fixture
def cli():
    return build_cli()


@pytest.fixture
def home(tmp_path: Path, cli) -> Path:
    home = tmp_path / "inst"
    result = CliRunner().invoke(cli, ["init", "--home", str(home), "--name", "hub-1"])
    assert result.exit_code == 0, result.output
    return home


def run(cli, *args: str):
    return CliRunner().invoke(cli, list(args))


def audit_json(cli, home: Path, *extra: str) -> list[dict]:
    result = run(cli, "audit", "list", "--home", str(home), "--json", *extra)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def table_rows(db: Path) -> dict[str, list[tuple]]:
    """Every row of every table but the audit log."""
    with closing(sqlite3.connect(db)) as conn:
        names = [n for (n,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name != 'audit_log'")]
        return {n: sorted(conn.execute(f"SELECT * FROM {n}").fetchall()) for n in names}


def test_cli_audit_verify_list_and_tamper(cli, home: Path) -> None:
    h = str(home)
    # Whatever `init` itself records (if anything) is the baseline.
    base = audit_json(cli, home)
    assert verify_chain_ok(cli, home, len(base))
    created = run(cli, "tenant", "create", "--home", h, "acme")
    assert created.exit_code == 0, created.output
    assert run(cli, "tenant", "create", "--home", h, "globex").exit_code == 0

    rows = audit_json(cli, home)
    assert rows[: len(base)] == base
    new = rows[len(base):]
    n = len(base)
    assert [(r["seq"], r["action"], r["outcome"], r["tenant"], r["target"]) for r in new] == [
        (n + 1, "tenant.create", "allowed", "acme", "acme"),
        (n + 2, "tenant.create", "allowed", "globex", "globex")]
    assert all(r["principal"].startswith("local:") for r in new)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))

    ok = run(cli, "audit", "verify", "--home", h)
    assert ok.exit_code == 0, ok.output
    assert f"audit trail intact: {len(rows)} records" in ok.stdout
    assert rows[-1]["hash"] in ok.stdout  # verify prints the head

    assert [r["tenant"] for r in audit_json(cli, home, "--tenant", "globex")] == ["globex"]
    assert [r["seq"] for r in audit_json(cli, home, "--limit", "1")] == [len(rows)]
    text = run(cli, "audit", "list", "--home", h)
    assert text.exit_code == 0 and "tenant.create" in text.stdout

    tamper_file(home / "state.db", "UPDATE audit_log SET reason='x' WHERE seq=1")
    bad = run(cli, "audit", "verify", "--home", h)
    assert bad.exit_code == 1
    assert "audit trail broken at record 1:" in bad.stderr
    assert "edited" in bad.stderr
    assert "intact" not in bad.stdout


def verify_chain_ok(cli, home: Path, count: int) -> bool:
    result = run(cli, "audit", "verify", "--home", str(home))
    return result.exit_code == 0 and f"audit trail intact: {count} records" in result.stdout


@pytest.mark.parametrize(("args", "code", "action", "why"), [
    (("tenant", "create", "acme"), 2, "tenant.create", "already exists"),
    (("tenant", "create", "Not_A_Slug"), 2, "tenant.create", "not a valid slug"),
    (("workspace", "create", "--tenant", "nope", "ws"), 3, "workspace.create", "not found"),
])
def test_cli_refusal_leaves_one_refused_record_and_no_change(
        cli, home: Path, args: tuple[str, ...], code: int, action: str, why: str) -> None:
    h = str(home)
    assert run(cli, "tenant", "create", "--home", h, "acme").exit_code == 0
    before = table_rows(home / "state.db")
    base = audit_json(cli, home)

    cmd, sub, *rest = args
    result = run(cli, cmd, sub, "--home", h, *rest)
    assert result.exit_code == code, result.output
    assert why in result.stderr

    assert table_rows(home / "state.db") == before  # nothing else changed
    rows = audit_json(cli, home)
    assert rows[: len(base)] == base
    (refused,) = rows[len(base):]
    assert (refused["action"], refused["outcome"]) == (action, "refused")
    assert why in refused["reason"]
    assert refused["principal"].startswith("local:")
    assert verify_chain_ok(cli, home, len(rows))


def test_cli_token_create_records_itself_once(cli, home: Path) -> None:
    h = str(home)
    assert run(cli, "tenant", "create", "--home", h, "acme").exit_code == 0
    base = audit_json(cli, home)
    made = run(cli, "token", "create", "--home", h, "--tenant", "acme", "--principal",
               "alice", "--json")
    assert made.exit_code == 0, made.output
    token = json.loads(made.stdout)
    refused = run(cli, "token", "create", "--home", h, "--tenant", "nope")
    assert refused.exit_code == 3

    rows = audit_json(cli, home)
    new = rows[len(base):]
    assert [(r["action"], r["outcome"]) for r in new] == [
        ("token.create", "allowed"), ("token.create", "refused")]
    assert new[0]["target"] == f"token {token['id']}"
    assert "principal alice" in new[0]["reason"]
    assert token["token"] not in json.dumps(rows)  # the secret never reaches the trail
    assert verify_chain_ok(cli, home, len(rows))
