"""Persistent message-id memory: a retry gets the stored answer, a replay is refused."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, select, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db import models
from shared.db.direct import Statements, direct_for
from shared.envelope import OpenedEnvelope, now_ms
from shared.errors import Unauthenticated, Unavailable
from shared.pb.v1 import wire_pb2

# A claim older than this, by a process that never answered, is taken over (that
# process stopped mid-way). Longer than any handler runs: a kill waits at most the
# spoke's max_grace_seconds (300 by default) and then some.
TAKEOVER_AFTER_MS = 10 * 60 * 1000
# How many old ids one transaction of forget_older_than drops.
FORGET_CHUNK = 1000


# INSERT ... ON CONFLICT DO NOTHING of a seen_messages row, per dialect; built once. Of
# processes sharing the database that insert an id at once, exactly one does; the
# others read its row.
_SEEN = cast(Table, models.SeenMessage.__table__)
_INSERT_NEW = {"postgresql": pg_insert(_SEEN).on_conflict_do_nothing(),
               "sqlite": sqlite_insert(_SEEN).on_conflict_do_nothing()}


def _new_row(sender: str, message_id: str, digest: str, *, response: bytes | None,
             claimed_by: str | None, at_ms: int) -> dict[str, Any]:
    """The parameters of _INSERT_NEW."""
    return {"sender": sender, "message_id": message_id, "envelope_sha256": digest,
            "response": response, "received_at_ms": at_ms, "claimed_by": claimed_by}


# A message's digest and answer, and who claimed it when: read when its id was there
# already (a retry, a replay, a claim to take over).
_SEEN_ROW = (select(models.SeenMessage.envelope_sha256, models.SeenMessage.response,
                    models.SeenMessage.claimed_by, models.SeenMessage.received_at_ms)
             .where(models.SeenMessage.sender == bindparam("b_sender"),
                    models.SeenMessage.message_id == bindparam("b_id")))
# Taking over a claim nobody answered, from no owner or from the owner b_was.
_UNANSWERED = (models.SeenMessage.sender == bindparam("b_sender"),
               models.SeenMessage.message_id == bindparam("b_id"),
               models.SeenMessage.response.is_(None))
_TAKE_UNOWNED = (update(models.SeenMessage)
                 .where(*_UNANSWERED, models.SeenMessage.claimed_by.is_(None))
                 .values(claimed_by=bindparam("b_owner"), received_at_ms=bindparam("b_now")))
_TAKE_FROM = (update(models.SeenMessage)
              .where(*_UNANSWERED, models.SeenMessage.claimed_by == bindparam("b_was"))
              .values(claimed_by=bindparam("b_owner"), received_at_ms=bindparam("b_now")))


# A message this process claimed: its answer stored, or its claim freed. Built once.
_CLAIMED_HERE = (models.SeenMessage.sender == bindparam("b_sender"),
                 models.SeenMessage.message_id == bindparam("b_id"),
                 models.SeenMessage.claimed_by == bindparam("b_owner"))
_ANSWERED = (update(models.SeenMessage).where(*_CLAIMED_HERE)
             .values(response=bindparam("b_response"), claimed_by=None))
_FREE = delete(models.SeenMessage).where(*_CLAIMED_HERE)

# How a transaction is run: AuditTrail.apply (under the daemon's write lock).
Apply = Callable[[Callable[[Statements], bytes]], Awaitable[bytes]]


class MessageMemory:
    """Runs each (sender, message_id) once and remembers its signed answer.

    The same id with the same bytes is a retry and gets the stored answer; the same id
    with other bytes is a replay attempt and is refused. Concurrent duplicates in this
    process wait for the first to finish. Several processes may share one PostgreSQL
    database (two hubs): the database's primary key decides which one claims an id, and
    a duplicate reaching the other process while the first is still at work is answered
    UNAVAILABLE, so its sender retries and gets the stored answer.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession],
                 write_lock: asyncio.Lock | None = None, *,
                 takeover_after_ms: int = TAKEOVER_AFTER_MS) -> None:
        self._sessions = sessions
        # Single statements run here, not through a session (shared/db/direct.py).
        self._direct = direct_for(sessions)
        # The daemon's one write lock (AuditTrail.write_lock), taken for each write.
        self._write_lock = write_lock or asyncio.Lock()
        # Per message id in flight: its lock and how many calls hold or await it.
        self._inflight: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}
        # Who this is, in seen_messages.claimed_by.
        self.owner = secrets.token_hex(8)
        self._takeover_after_ms = takeover_after_ms

    async def once(
        self, opened: OpenedEnvelope, handle: Callable[[], Awaitable[bytes]], *,
        reads_only: bool = False,
    ) -> bytes:
        """Return the stored answer for this message, or run handle() and store its.

        reads_only: handle() changes nothing (a status or list query), so it may run
        before the id is recorded, and the id and answer are written together.
        """
        env = opened.envelope
        digest = hashlib.sha256(opened.raw).hexdigest()
        async with self._alone(env):
            if reads_only:
                return await self._answer_read(env.sender, env.message_id, digest, handle)
            stored = await self._claim(env.sender, env.message_id, digest)
            if stored is not None:
                return stored
            try:
                answer = await handle()
            except BaseException:
                # Nothing was answered: free the id so a retry is handled afresh.
                async with self._write_lock:
                    await self._direct.write(_FREE, self._mine(env.sender, env.message_id))
                raise
            async with self._write_lock:
                await self._direct.write(_ANSWERED, {
                    **self._mine(env.sender, env.message_id), "b_response": answer})
            return answer

    @asynccontextmanager
    async def _alone(self, env: wire_pb2.Envelope) -> AsyncIterator[None]:
        """Held while this process handles a message id: a concurrent duplicate waits,
        then finds the stored answer."""
        key = (env.sender, env.message_id)
        lock, users = self._inflight.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._inflight[key]

    async def once_within(self, opened: OpenedEnvelope,
                          handle: Callable[[Statements], bytes], apply: Apply
                          ) -> bytes:
        """once(), with handle() run among the statements of the transaction that claims
        the id and stores the answer (run by apply: AuditTrail.apply): the id, what
        handle() changed and the answer are committed together or not at all. For quick
        handlers only (a status report): the daemon's write lock is held throughout."""
        env = opened.envelope
        digest = hashlib.sha256(opened.raw).hexdigest()

        def within(tx: Statements) -> bytes:
            stored = self._claim_in(tx, env.sender, env.message_id, digest)
            if stored is not None:
                return stored
            answer = handle(tx)
            tx.run(_ANSWERED, {**self._mine(env.sender, env.message_id),
                               "b_response": answer})
            return answer

        async with self._alone(env):
            return await apply(within)

    async def _answer_read(self, sender: str, message_id: str, digest: str,
                           handle: Callable[[], Awaitable[bytes]]) -> bytes:
        """Answer a query, then record its id with the answer in one write (one
        transaction instead of a claim and an answer). A retry (same bytes) gets the
        stored answer; other bytes under a known id are refused as a replay, after the
        query ran: a query changes nothing, so nothing was done twice."""
        answer = await handle()
        row = _new_row(sender, message_id, digest, response=answer, claimed_by=None,
                       at_ms=now_ms())
        async with self._write_lock:
            if await self._direct.write(_INSERT_NEW[self._direct.dialect], row) == 1:
                return answer
        seen = await self._direct.first(_SEEN_ROW, {"b_sender": sender, "b_id": message_id})
        if seen is not None and seen[0] != digest:
            raise Unauthenticated(
                f"envelope rejected: message_id '{message_id}' was already used with "
                "other content (replay)")
        # A retry: the first answer stands (or, if it is still being worked out
        # elsewhere, this one is as good: the query changed nothing).
        return seen[1] if seen is not None and seen[1] is not None else answer

    def _mine(self, sender: str, message_id: str) -> dict[str, str]:
        """Parameters of _ANSWERED and _FREE: this message, claimed by this process."""
        return {"b_sender": sender, "b_id": message_id, "b_owner": self.owner}

    async def _claim(self, sender: str, message_id: str, digest: str) -> bytes | None:
        """Claim the id for this process in a transaction of its own (None: go on and
        handle it), or return the stored answer; refuse a replay, or a duplicate another
        process is handling."""
        async with self._write_lock:
            return await self._direct.transaction(
                lambda tx: self._claim_in(tx, sender, message_id, digest))

    def _claim_in(self, tx: Statements, sender: str, message_id: str, digest: str
                  ) -> bytes | None:
        """_claim, among the statements of the caller's transaction. Almost always the id
        is new: one statement. Otherwise its row decides (a retry, a replay, or a claim
        to take over)."""
        now = now_ms()
        if tx.run(_INSERT_NEW[tx.dialect], _new_row(sender, message_id, digest, response=None,
                                                   claimed_by=self.owner, at_ms=now)) == 1:
            return None
        seen = tx.first(_SEEN_ROW, {"b_sender": sender, "b_id": message_id})
        if seen is None:
            raise Unavailable(f"message {message_id} was claimed and freed "
                              "concurrently; retry shortly")
        seen_digest, response, claimed_by, received_at_ms = seen
        if seen_digest != digest:
            raise Unauthenticated(
                f"envelope rejected: message_id '{message_id}' was already used with "
                "other content (replay)")
        if response is not None:
            return cast(bytes, response)
        # Claimed but not answered. In this process nobody holds it (the lock above),
        # so a claim of ours or one without an owner was left by a stop mid-way; on
        # SQLite, whose database belongs to one daemon, so was any other. Handlers are
        # idempotent per message (a spawn by its agent id): handle it again.
        abandoned = (claimed_by in (None, self.owner) or tx.dialect != "postgresql"
                     or now - received_at_ms > self._takeover_after_ms)
        if not abandoned:
            raise Unavailable(f"message {message_id} is being handled by another "
                              "process sharing this instance's database; retry shortly")
        take = {"b_sender": sender, "b_id": message_id, "b_owner": self.owner, "b_now": now}
        taken = (tx.run(_TAKE_UNOWNED, take) if claimed_by is None
                 else tx.run(_TAKE_FROM, {**take, "b_was": claimed_by}))
        if taken != 1:
            raise Unavailable(f"message {message_id} was taken over concurrently; "
                              "retry shortly")
        return None

    async def forget_older_than(self, cutoff_ms: int, *, chunk: int = FORGET_CHUNK) -> int:
        """Drop ids received before cutoff_ms (only ever past the skew window), at most
        chunk per transaction: other writers wait for one chunk at most, and on SQLite
        (where this runs on the event loop's thread) the loop for a few milliseconds."""
        m = models.SeenMessage
        oldest = (select(m.sender, m.message_id).where(m.received_at_ms < cutoff_ms)
                  .limit(chunk))
        forgotten = 0
        while True:
            async with self._write_lock, self._sessions() as session, session.begin():
                result = await session.execute(
                    delete(m).where(tuple_(m.sender, m.message_id).in_(oldest))
                    .execution_options(synchronize_session=False))
            done = int(getattr(result, "rowcount", 0) or 0)
            forgotten += done
            if done < chunk:
                return forgotten
