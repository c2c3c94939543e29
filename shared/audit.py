"""The audit trail: an append-only, hash-chained record of every change and refusal.

Each record holds the hash of the one before it; its own hash covers its sequence
number, every field and that previous hash. Editing, reordering, or removing any record
but the newest breaks the chain at that record, which `verify_chain` names; removing
records from the end shows only as a different head hash. A record is appended in the
same transaction as the change it describes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any, TypeVar

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db import models
from shared.db.direct import Direct, Row, Statements, direct_for
from shared.db.engine import ADVISORY_XACT_LOCK, AUDIT_CHAIN_LOCK, lock_for_transaction
from shared.envelope import now_ms

T = TypeVar("T")

GENESIS = "0" * 64
ALLOWED = "allowed"
REFUSED = "refused"


@dataclass(frozen=True)
class AuditEntry:
    """What happened, as the instance that decided it saw it."""

    action: str
    outcome: str
    tenant: str = ""
    workspace: str = ""
    principal: str = ""
    peer: str = ""
    target: str = ""
    message_id: str = ""
    reason: str = ""


_FIELDS = tuple(AuditEntry.__dataclass_fields__)


def record_hash(seq: int, at_ms: int, fields: dict[str, str], prev_hash: str) -> str:
    """SHA-256 of a canonical JSON array of the record: order and types fixed."""
    body = [seq, at_ms, *(fields[name] for name in _FIELDS), prev_hash]
    return hashlib.sha256(json.dumps(body, ensure_ascii=False, separators=(",", ":"))
                          .encode()).hexdigest()


# Built once: asked in every audited transaction.
_TAIL = (select(models.AuditRecord.seq, models.AuditRecord.hash)
         .order_by(models.AuditRecord.seq.desc()).limit(1))
_ADD = insert(models.AuditRecord)


def _next_record(tail: Row | None, entry: AuditEntry, at_ms: int | None) -> dict[str, Any]:
    """The columns of the record of entry that follows tail (the chain's last record's
    seq and hash; None if the chain is empty)."""
    seq, prev = (tail[0] + 1, tail[1]) if tail else (1, GENESIS)
    at = now_ms() if at_ms is None else at_ms
    # Read field by field: dataclasses.asdict deep-copies every value first.
    fields = {name: str(getattr(entry, name))[:2000] for name in _FIELDS}
    return {"seq": seq, "at_ms": at, "prev_hash": prev,
            "hash": record_hash(seq, at, fields, prev), **fields}


async def append_audit(session: AsyncSession, entry: AuditEntry,
                       at_ms: int | None = None) -> models.AuditRecord:
    """Append entry to the chain inside the caller's transaction. On a database shared
    by several processes (two hubs on one PostgreSQL), the chain's tail is locked until
    the transaction ends, so two appends never take the same place."""
    await lock_for_transaction(session, AUDIT_CHAIN_LOCK)
    tail = (await session.execute(_TAIL)).first()
    record = models.AuditRecord(**_next_record(tuple(tail) if tail else None, entry, at_ms))
    # Flushed with what the transaction changed so far, in the unit of work's order: on
    # PostgreSQL that order is part of how concurrent writers avoid deadlock (a plain
    # INSERT here, leaving the rest to the commit, deadlocked concurrent token
    # rotations and creations).
    session.add(record)
    await session.flush()
    return record


def add_audit(tx: Statements, entry: AuditEntry, at_ms: int | None = None) -> None:
    """append_audit, among the statements of an AuditTrail.apply transaction (which
    took the chain's lock first)."""
    tx.run(_ADD, _next_record(tx.first(_TAIL), entry, at_ms))


class AuditTrail:
    """A daemon's writer: one transaction at a time appends, so the chain never forks."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._lock = asyncio.Lock()
        # Set after a change that queued work for a background sender (the outbox).
        self.pending = asyncio.Event()

    def changed(self) -> None:
        """Wake whoever drains what committed transactions queued."""
        self.pending.set()

    @cached_property
    def direct(self) -> Direct:
        """Where the hottest reads run, instead of through a session
        (shared/db/direct.py)."""
        return direct_for(self._sessions)

    @asynccontextmanager
    async def reader(self) -> AsyncIterator[AsyncSession]:
        """A session for reads only: no lock, no audit."""
        async with self._sessions() as session:
            yield session

    @property
    def write_lock(self) -> asyncio.Lock:
        """Held by every write transaction of this daemon, so SQLite never sees two of
        its writers at once (a second one would wait in SQLite's busy handler, which
        sleeps in steps of up to 100 ms)."""
        return self._lock

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A transaction that may append audit records (and change anything else).

        On PostgreSQL it takes the audit chain's lock first, before any row lock, so
        that transactions of two processes sharing the database always lock in the same
        order and never deadlock; they are serialised, as SQLite's are.
        """
        async with self._lock, self._sessions() as session, session.begin():
            await lock_for_transaction(session, AUDIT_CHAIN_LOCK)
            yield session

    async def apply(self, body: Callable[[Statements], T]) -> T:
        """Run body's statements in one transaction, appending audit records with
        add_audit; body's result. The cheapest way to make a change: on SQLite, on the
        event loop's thread with no session (shared/db/direct.py; body is synchronous
        and may run twice, its first run rolled back). Like transaction(), it holds the
        write lock and, on PostgreSQL, takes the chain's lock before anything else."""
        def chained(tx: Statements) -> T:
            if tx.dialect == "postgresql":
                tx.rows(ADVISORY_XACT_LOCK, {"key": AUDIT_CHAIN_LOCK})
            return body(tx)

        async with self._lock:
            return await self.direct.transaction(chained)

    async def record(self, entry: AuditEntry) -> None:
        """Append entry in a transaction of its own (refusals change nothing else)."""
        await self.apply(lambda tx: add_audit(tx, entry))


@dataclass(frozen=True)
class ChainBreak:
    seq: int
    problem: str


def verify_chain(records: Sequence[models.AuditRecord]) -> ChainBreak | None:
    """The first record (in seq order) where the chain is broken, or None."""
    prev, expected_seq = GENESIS, 1
    for rec in records:
        if rec.seq != expected_seq:
            return ChainBreak(rec.seq, f"expected record {expected_seq} here: a record was "
                                       "removed or the order changed")
        if rec.prev_hash != prev:
            return ChainBreak(rec.seq, "its previous-hash does not match the record before "
                                       "it: a record was removed, inserted or reordered")
        fields = {name: getattr(rec, name) for name in _FIELDS}
        if rec.hash != record_hash(rec.seq, rec.at_ms, fields, rec.prev_hash):
            return ChainBreak(rec.seq, "its content does not match its hash: it was edited")
        prev, expected_seq = rec.hash, expected_seq + 1
    return None


async def load_records(session: AsyncSession, tenant: str | None = None
                       ) -> list[models.AuditRecord]:
    query = select(models.AuditRecord).order_by(models.AuditRecord.seq)
    if tenant is not None:
        query = query.where(models.AuditRecord.tenant == tenant)
    return list((await session.execute(query)).scalars())
