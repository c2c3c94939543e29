"""Idempotency keys for the operator calls that create or change something.

A caller names a request with a key (gRPC metadata `idempotency-key`; the command line
and the client make one per invocation and reuse it on their own retries). The first
call with a key runs; the same key with the same request again gets the first answer,
or the first refusal; the same key with another request is refused. A call that failed
in a way a retry may not meet (the spoke was unreachable, an internal error) lets its
key go, so the retry runs again: a spawn's retry reuses the same agent id (made from the
key), so the spoke still starts one agent, not two. Keys are kept for a day, per tenant
and principal.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from shared.audit import AuditTrail
from shared.db import models
from shared.envelope import now_ms
from shared.errors import (
    IDEMPOTENCY_KEY,
    FleetwireError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from shared.scope import current_scope

RETENTION_MS = 24 * 3600 * 1000
# Keys past their retention removed per call that makes one.
PRUNE_BATCH = 100
_KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}\Z")
RUNNING, DONE, REFUSED = "RUNNING", "DONE", "REFUSED"
# Refusals a retry may not meet: the key is let go, not kept with them.
_PASSING = (Unavailable, Internal)
_ERRORS = {cls.__name__: cls for cls in (InvalidArgument, Unauthenticated, NotFound,
                                         PermissionDenied, ResourceExhausted)}
M = TypeVar("M", bound=Message)


def key_of(context: grpc.aio.ServicerContext) -> str:
    """The call's idempotency key ("" for none); InvalidArgument if it is malformed."""
    for name, value in context.invocation_metadata() or ():
        if name == IDEMPOTENCY_KEY and isinstance(value, str):
            if not _KEY_RE.match(value):
                raise InvalidArgument(
                    "idempotency key must be 1 to 128 letters, digits and . _ : -; "
                    "leave it out to have one made")
            return value
    return ""


def agent_id_for(key: str) -> str:
    """The agent id a spawn made with this key gets, in the caller's tenant and name:
    every retry of the spawn names the same agent."""
    scope = current_scope()
    seed = f"{scope.tenant}\0{scope.principal.name}\0{key}".encode()
    return hashlib.sha256(seed).hexdigest()[:32]


class IdempotencyKeys:
    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    async def once(self, method: str, request: Message, key: str,
                   run: Callable[[], Awaitable[M]], answer: type[M], *,
                   secret: bool = False) -> M:
        """run() once per key: its answer, or the first answer of this key. An answer
        that holds a secret (a new token) is not kept: the same key again is refused,
        saying so."""
        if not key:
            return await run()
        scope = current_scope()
        where = dict(tenant=scope.tenant, principal=scope.principal.name, key=key)
        digest = hashlib.sha256(method.encode() + b"\0"
                                + request.SerializeToString(deterministic=True)).hexdigest()
        found = await self._claim(where, method, digest)
        if found is not None:
            return _replay(found, method, digest, key, answer, secret)
        try:
            result = await run()
        except _PASSING:
            await self._let_go(where)
            raise
        except FleetwireError as err:
            await self._settle(where, REFUSED, error=err)
            raise
        except BaseException:
            await self._let_go(where)
            raise
        await self._settle(where, DONE, response=b"" if secret else result.SerializeToString())
        return result

    async def _claim(self, where: dict[str, str], method: str,
                     digest: str) -> models.IdempotencyKey | None:
        """Take the key for this call (None), or what an earlier call left under it."""
        now = now_ms()
        try:
            async with self._trail.transaction() as session:
                session.add(models.IdempotencyKey(**where, method=method,
                                                  request_sha256=digest, state=RUNNING,
                                                  created_at_ms=now))
                await session.flush()
                stale = select(models.IdempotencyKey.key).where(
                    models.IdempotencyKey.created_at_ms < now - RETENTION_MS
                ).limit(PRUNE_BATCH)
                await session.execute(delete(models.IdempotencyKey).where(
                    models.IdempotencyKey.key.in_(stale),
                    models.IdempotencyKey.created_at_ms < now - RETENTION_MS))
            return None
        except IntegrityError:
            async with self._trail.reader() as session:
                row = await session.get(models.IdempotencyKey,
                                        (where["tenant"], where["principal"], where["key"]))
            if row is None:  # let go between the two: take it again
                return await self._claim(where, method, digest)
            return row

    async def _settle(self, where: dict[str, str], state: str, *, response: bytes = b"",
                      error: FleetwireError | None = None) -> None:
        async with self._trail.transaction() as session:
            row = await session.get(models.IdempotencyKey,
                                    (where["tenant"], where["principal"], where["key"]))
            if row is not None:
                row.state, row.response = state, response or None
                if error is not None:
                    row.error_code, row.error_message = type(error).__name__, error.message

    async def _let_go(self, where: dict[str, str]) -> None:
        async with self._trail.transaction() as session:
            row = await session.get(models.IdempotencyKey,
                                    (where["tenant"], where["principal"], where["key"]))
            if row is not None:
                await session.delete(row)


def _replay(row: models.IdempotencyKey, method: str, digest: str, key: str,
            answer: type[M], secret: bool) -> M:
    if row.method != method or row.request_sha256 != digest:
        raise InvalidArgument(
            f"idempotency key '{key}' was used for another request ({row.method} with other "
            "arguments); use a new key for a new request")
    if row.state == RUNNING:
        raise Unavailable(f"the request with idempotency key '{key}' is still being carried "
                          "out; retry when it has finished", retry_after_ms=1000)
    if row.state == REFUSED:
        raise _ERRORS.get(row.error_code, Internal)(row.error_message)
    if secret:
        raise InvalidArgument(
            f"the request with idempotency key '{key}' was carried out already; its answer "
            "held a token, which is shown only once and is not kept: list the tokens to "
            "find it, or use a new key to make another")
    return answer.FromString(row.response or b"")
