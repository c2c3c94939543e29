"""Sending signed commands to spokes and trusting only their signed answers.

One channel per spoke, reused, with one Exchange stream on it (hub/streams.py). A
command is sealed once; retries (UNAVAILABLE and DEADLINE_EXCEEDED only) re-send the
same bytes, so the spoke's message-id memory turns a retry into the first answer, never
a second action.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from hub.streams import SpokeStreams
from shared.config import Config
from shared.envelope import Keyring, now_ms, open_reply, seal_envelope
from shared.errors import (
    Unauthenticated,
    Unavailable,
    from_rpc_error,
)
from shared.identity import Identity
from shared.metrics import Metrics
from shared.pb.v1 import wire_pb2
from shared.rpc import PeerCerts, PeerChannels

log = logging.getLogger(__name__)

# One attempt: the signed bytes and the attempt's timeout in, the signed answer out.
Send = Callable[[wire_pb2.SignedEnvelope, float], Awaitable[wire_pb2.SignedEnvelope]]

_RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() in _RETRYABLE


class _Unreachable(Exception):
    """Every attempt failed in a way a later one might not have; last: the last error."""

    def __init__(self, last: BaseException | None) -> None:
        super().__init__(str(last))
        self.last = last


class SpokeDispatcher:
    def __init__(self, cfg: Config, identity: Identity, keyring: Keyring,
                 certs: PeerCerts | None, metrics: Metrics) -> None:
        self._cfg = cfg
        self._identity = identity
        self._keyring = keyring
        self._metrics = metrics
        self._channels = PeerChannels(cfg.keepalive, certs)
        self._streams = SpokeStreams()

    @property
    def channels(self) -> PeerChannels:
        return self._channels

    def budget_seconds(self, extra_timeout: float = 0.0) -> float:
        """How long delivering a command may take, every attempt and wait included."""
        retry = self._cfg.retry
        waits = sum(min(retry.initial_backoff_seconds * 2.0 ** n, retry.max_backoff_seconds)
                    for n in range(retry.attempts - 1))
        return retry.attempts * (retry.attempt_timeout_seconds + extra_timeout) + waits

    def seal(self, spoke: str, command: wire_pb2.Command, *, extra_timeout: float = 0.0
             ) -> tuple[str, wire_pb2.SignedEnvelope]:
        """Sign a command for a spoke once; returns its message_id and the envelope. Its
        deadline is when the hub will have given up delivering it (see deliver()): a
        spoke reached later does nothing, so nothing runs that its caller was told had
        failed."""
        command.deadline_ms = now_ms() + int(self.budget_seconds(extra_timeout) * 1000)
        signed = seal_envelope(self._identity, recipient=spoke, command=command)
        return wire_pb2.Envelope.FromString(signed.envelope).message_id, signed

    async def send(self, spoke: str, address: str, command: wire_pb2.Command,
                   *, extra_timeout: float = 0.0) -> wire_pb2.Response:
        """Seal and deliver a command."""
        message_id, signed = self.seal(spoke, command, extra_timeout=extra_timeout)
        return await self.deliver(spoke, address, message_id, signed,
                                  extra_timeout=extra_timeout)

    async def deliver(self, spoke: str, address: str, message_id: str,
                      signed: wire_pb2.SignedEnvelope, *,
                      extra_timeout: float = 0.0) -> wire_pb2.Response:
        """Send with retries (same bytes), verify the signed answer, raise its Error."""
        kind = wire_pb2.Envelope.FromString(signed.envelope).command.WhichOneof("action")
        with self._metrics.command(kind or "none"):
            return await self._deliver(spoke, address, message_id, signed, extra_timeout)

    async def _deliver(self, spoke: str, address: str, message_id: str,
                       signed: wire_pb2.SignedEnvelope, extra_timeout: float
                       ) -> wire_pb2.Response:
        channel = await self._channels.get(spoke, address)

        def send(signed: wire_pb2.SignedEnvelope, timeout: float
                 ) -> Awaitable[wire_pb2.SignedEnvelope]:
            return self._streams.deliver(spoke, channel, signed, timeout)

        retry = self._cfg.retry
        try:
            reply = await self._attempts(
                send, signed, retry.attempt_timeout_seconds + extra_timeout)
        except _Unreachable as exc:
            last = exc.last
            detail = last.details() if isinstance(last, grpc.aio.AioRpcError) else str(last)
            raise Unavailable(
                f"spoke '{spoke}' at {address} is unreachable after {retry.attempts} "
                f"attempts ({detail}); check that it runs and the address is right"
            ) from None
        except grpc.aio.AioRpcError as exc:
            err = from_rpc_error(exc, target=f"spoke '{spoke}'")
            if isinstance(err, Unauthenticated):
                err = Unauthenticated(
                    f"spoke '{spoke}' refused this hub's signed command: {err.message}")
            raise err from None
        return await self._verify(spoke, message_id, reply)

    async def _attempts(self, send: Send, signed: wire_pb2.SignedEnvelope, timeout: float
                        ) -> wire_pb2.SignedEnvelope:
        """Deliver the same bytes up to retry.attempts times while the failure is one a
        later attempt may not meet, waiting initial_backoff_seconds, then twice that,
        and so on up to max_backoff_seconds; _Unreachable when every attempt failed so.

        The first attempt runs outside tenacity (whose loop costs about 80 µs of CPU
        per call here, and nearly every call succeeds at once); the retries continue
        its schedule.
        """
        retry = self._cfg.retry
        try:
            return await send(signed, timeout)
        except grpc.aio.AioRpcError as exc:
            if not _retryable(exc):
                raise
            first = exc
        if retry.attempts < 2:
            raise _Unreachable(first)
        await asyncio.sleep(min(retry.initial_backoff_seconds, retry.max_backoff_seconds))
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception(_retryable),
                stop=stop_after_attempt(retry.attempts - 1),
                # Attempt n of this loop is attempt n + 1 of the whole: its wait doubles.
                wait=wait_exponential(multiplier=2 * retry.initial_backoff_seconds,
                                      max=retry.max_backoff_seconds),
                reraise=False,
            ):
                with attempt:
                    return await send(signed, timeout)
        except RetryError as exc:
            raise _Unreachable(exc.last_attempt.exception()) from None
        raise AssertionError("tenacity's loop ends by a return or an exception")

    async def _verify(self, spoke: str, message_id: str,
                      reply: wire_pb2.SignedEnvelope) -> wire_pb2.Response:
        try:
            return await open_reply(reply, keyring=self._keyring, me=self._identity.name,
                                    peer=spoke, message_id=message_id,
                                    skew_ms=self._cfg.wire.max_clock_skew_seconds * 1000)
        except Unauthenticated as err:
            log.warning("answer from spoke %s to %s rejected: %s", spoke, message_id,
                        err.message, extra={"peer": spoke, "message_id": message_id})
            raise Unauthenticated(
                f"the answer from spoke '{spoke}' failed verification: {err.message}"
            ) from None

    async def close(self) -> None:
        await self._streams.close()
        await self._channels.close()
