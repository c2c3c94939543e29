"""The spoke's gRPC surface: commands in, signed answers out (via the shared inbox)."""

from __future__ import annotations

import grpc

from shared.audit import AuditTrail
from shared.envelope import OpenedEnvelope
from shared.inbox import EnvelopeInbox
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.rotation import take_announcement
from spoke.commands import SpokeCommands

_ACCEPTS = frozenset({"command", "key_announcement"})
# Commands that change nothing: their id and answer are recorded in one write.
_QUERIES = frozenset({"get", "list", "logs"})


def _is_query(envelope: wire_pb2.Envelope) -> bool:
    return (envelope.WhichOneof("body") == "command"
            and envelope.command.WhichOneof("action") in _QUERIES)


class SpokeService(wire_pb2_grpc.SpokeServiceServicer):
    def __init__(self, inbox: EnvelopeInbox, commands: SpokeCommands,
                 trail: AuditTrail) -> None:
        self._inbox = inbox
        self._commands = commands
        self._trail = trail

    async def Deliver(  # noqa: N802 (gRPC method name)
        self, request: wire_pb2.SignedEnvelope, context: grpc.aio.ServicerContext
    ) -> wire_pb2.SignedEnvelope:
        return await self._inbox.deliver(
            request, context, accepts=_ACCEPTS, answer=self._answer, reads_only=_is_query,
            refusal="this spoke accepts only commands and key announcements")

    async def _answer(self, opened: OpenedEnvelope) -> wire_pb2.Response:
        env = opened.envelope
        if env.WhichOneof("body") == "key_announcement":
            return await take_announcement(self._trail, opened)
        return await self._commands.handle(env.sender, env.command, env.message_id)
