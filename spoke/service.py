"""The spoke's gRPC surface: commands in, signed answers out (via the shared inbox)."""

from __future__ import annotations

import grpc

from shared.envelope import OpenedEnvelope
from shared.inbox import EnvelopeInbox
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from spoke.commands import SpokeCommands

_COMMANDS = frozenset({"command"})


class SpokeService(wire_pb2_grpc.SpokeServiceServicer):
    def __init__(self, inbox: EnvelopeInbox, commands: SpokeCommands) -> None:
        self._inbox = inbox
        self._commands = commands

    async def Deliver(  # noqa: N802 (gRPC method name)
        self, request: wire_pb2.SignedEnvelope, context: grpc.aio.ServicerContext
    ) -> wire_pb2.SignedEnvelope:
        return await self._inbox.deliver(request, context, accepts=_COMMANDS,
                                         refusal="this spoke accepts only commands",
                                         answer=self._answer)

    async def _answer(self, opened: OpenedEnvelope) -> wire_pb2.Response:
        env = opened.envelope
        return await self._commands.handle(env.sender, env.command, env.message_id)
