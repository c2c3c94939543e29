"""The spoke's gRPC surface: commands in, signed answers out (via the shared inbox)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from shared.audit import AuditTrail
from shared.envelope import OpenedEnvelope
from shared.errors import FleetwireError, Internal, abort
from shared.inbox import EnvelopeInbox
from shared.metrics import Metrics
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.rotation import take_announcement
from spoke.commands import SpokeCommands

log = logging.getLogger(__name__)

_ACCEPTS = frozenset({"command", "key_announcement"})
# Commands that change nothing: their id and answer are recorded in one write.
_QUERIES = frozenset({"get", "list", "logs"})


_REFUSAL = "this spoke accepts only commands and key announcements"


def _refused(call: int, err: FleetwireError) -> wire_pb2.Delivered:
    return wire_pb2.Delivered(call=call, refusal=wire_pb2.Refusal(
        status=err.status.value[0], message=err.message, retry_after_ms=err.retry_after_ms))


def _is_query(envelope: wire_pb2.Envelope) -> bool:
    return (envelope.WhichOneof("body") == "command"
            and envelope.command.WhichOneof("action") in _QUERIES)


class SpokeService(wire_pb2_grpc.SpokeServiceServicer):
    def __init__(self, inbox: EnvelopeInbox, commands: SpokeCommands,
                 trail: AuditTrail, metrics: Metrics) -> None:
        self._inbox = inbox
        self._metrics = metrics
        self._commands = commands
        self._trail = trail
        # Exchange calls being served, each by its task; ended by stop_streams().
        self._streams: set[asyncio.Task[object]] = set()
        self._stopping = False

    async def Deliver(  # noqa: N802 (gRPC method name)
        self, request: wire_pb2.SignedEnvelope, context: grpc.aio.ServicerContext
    ) -> wire_pb2.SignedEnvelope:
        return await self._inbox.deliver(
            request, context, accepts=_ACCEPTS, answer=self._answer, reads_only=_is_query,
            refusal=_REFUSAL)

    async def Exchange(  # noqa: N802 (gRPC method name)
        self, deliveries: AsyncIterator[wire_pb2.Delivery], context: grpc.aio.ServicerContext
    ) -> None:
        """Deliver, for each delivery on the stream: handled side by side, each answer
        written as soon as it is ready. Ends (with OK) when the spoke stops; the hub
        sends what was left unanswered again, as it would after a failed Deliver."""
        # One connection carries the whole stream: what it presented is asked once.
        try:
            presented = self._inbox.presented(context)
        except FleetwireError as err:
            await abort(context, err)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        writing = asyncio.Lock()
        handling: set[asyncio.Task[None]] = set()

        async def answer(delivery: wire_pb2.Delivery) -> None:
            frame = await self._delivered(delivery, presented)
            async with writing:
                try:
                    await context.write(frame)
                except Exception as exc:
                    # The hub left: its retry is answered from the message-id memory.
                    log.debug("answer to delivery %d not written: %r", delivery.call, exc)

        with self._metrics.command_stream() as carried:
            try:
                async for delivery in deliveries:
                    carried()
                    work = asyncio.ensure_future(answer(delivery))
                    handling.add(work)
                    work.add_done_callback(handling.discard)
            except asyncio.CancelledError:
                if not self._stopping:
                    raise
            finally:
                self._streams.discard(task)
            if handling:
                await asyncio.wait(handling)

    async def _delivered(self, delivery: wire_pb2.Delivery,
                         presented: str | None) -> wire_pb2.Delivered:
        try:
            # This runs in the delivery's own task, which nothing cancels (the stream's
            # end does not): the command runs to its end without a task of its own.
            sealed = await self._inbox.sealed_answer(
                delivery.envelope, presented, accepts=_ACCEPTS, answer=self._answer,
                reads_only=_is_query, refusal=_REFUSAL, caller_may_leave=False)
        except FleetwireError as err:
            return _refused(delivery.call, err)
        except Exception:
            log.exception("delivery %d on a command stream failed", delivery.call)
            return _refused(delivery.call,
                            Internal("internal error on the spoke; its log has the details"))
        return wire_pb2.Delivered(call=delivery.call,
                                  envelope=wire_pb2.SignedEnvelope.FromString(sealed))

    def stop_streams(self) -> None:
        """End every Exchange stream once what it carries is answered (before the
        server stops: an open stream would hold the stop for its whole grace)."""
        self._stopping = True
        for task in self._streams:
            task.cancel()

    async def _answer(self, opened: OpenedEnvelope) -> wire_pb2.Response:
        env = opened.envelope
        if env.WhichOneof("body") == "key_announcement":
            return await take_announcement(self._trail, opened)
        return await self._commands.handle(env.sender, env.command, env.message_id)
