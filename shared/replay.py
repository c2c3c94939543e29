"""Persistent message-id memory: a retry gets the stored answer, a replay is refused."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable

from sqlalchemy import delete, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db import models
from shared.envelope import OpenedEnvelope, now_ms
from shared.errors import Internal, Unauthenticated


class MessageMemory:
    """Runs each (sender, message_id) once and remembers its signed answer.

    The same id with the same bytes is a retry and gets the stored answer; the same id
    with other bytes is a replay attempt and is refused. Concurrent duplicates wait for
    the first to finish.
    """

    def __init__(self, sessions: async_sessionmaker[AsyncSession],
                 write_lock: asyncio.Lock | None = None) -> None:
        self._sessions = sessions
        # The daemon's one write lock (AuditTrail.write_lock), taken for each write.
        self._write_lock = write_lock or asyncio.Lock()
        # Per message id in flight: its lock and how many calls hold or await it.
        self._inflight: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    async def once(
        self, opened: OpenedEnvelope, handle: Callable[[], Awaitable[bytes]]
    ) -> bytes:
        """Return the stored answer for this message, or run handle() and store its."""
        env = opened.envelope
        key = (env.sender, env.message_id)
        digest = hashlib.sha256(opened.raw).hexdigest()
        lock, users = self._inflight.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                async with self._write_lock, self._sessions() as session, session.begin():
                    seen = await session.get(models.SeenMessage, key)
                    if seen is None:
                        session.add(models.SeenMessage(
                            sender=env.sender, message_id=env.message_id,
                            envelope_sha256=digest, response=None,
                            received_at_ms=now_ms()))
                        try:
                            await session.flush()
                        except IntegrityError:
                            raise Internal("message id claimed concurrently") from None
                if seen is not None:
                    if seen.envelope_sha256 != digest:
                        raise Unauthenticated(
                            f"envelope rejected: message_id '{env.message_id}' was already "
                            "used with other content (replay)"
                        )
                    if seen.response is not None:
                        return seen.response
                    # Claimed but never answered, and nobody here holds it: the process
                    # stopped mid-way. Handle it again; handlers are idempotent per
                    # message (a spawn by its agent id).
                try:
                    answer = await handle()
                except BaseException:
                    # Nothing was answered: free the id so a retry is handled afresh.
                    async with self._write_lock, self._sessions() as session, session.begin():
                        await session.execute(
                            delete(models.SeenMessage)
                            .where(models.SeenMessage.sender == env.sender,
                                   models.SeenMessage.message_id == env.message_id))
                    raise
                async with self._write_lock, self._sessions() as session, session.begin():
                    await session.execute(
                        update(models.SeenMessage)
                        .where(models.SeenMessage.sender == env.sender,
                               models.SeenMessage.message_id == env.message_id)
                        .values(response=answer))
                return answer
        finally:
            users[0] -= 1
            if users[0] == 0:
                del self._inflight[key]

    async def forget_older_than(self, cutoff_ms: int) -> int:
        """Drop ids received before cutoff_ms (only ever past the skew window)."""
        async with self._write_lock, self._sessions() as session, session.begin():
            result = await session.execute(
                delete(models.SeenMessage).where(models.SeenMessage.received_at_ms < cutoff_ms))
        return int(getattr(result, "rowcount", 0) or 0)
