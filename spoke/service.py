"""The spoke's gRPC surface: open the envelope, run the command once, sign the answer."""

from __future__ import annotations

import grpc

from shared.audit import REFUSED, AuditEntry, AuditTrail
from shared.envelope import Keyring, OpenedEnvelope, open_envelope, seal_envelope
from shared.errors import FleetwireError, InvalidArgument, abort
from shared.identity import Identity
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.replay import MessageMemory
from spoke.commands import SpokeCommands


class SpokeService(wire_pb2_grpc.SpokeServiceServicer):
    def __init__(self, identity: Identity, keyring: Keyring, memory: MessageMemory,
                 commands: SpokeCommands, trail: AuditTrail, skew_ms: int) -> None:
        self._trail = trail
        self._identity = identity
        self._keyring = keyring
        self._memory = memory
        self._commands = commands
        self._skew_ms = skew_ms

    async def Deliver(  # noqa: N802 (gRPC method name)
        self, request: wire_pb2.SignedEnvelope, context: grpc.aio.ServicerContext
    ) -> wire_pb2.SignedEnvelope:
        try:
            opened = await open_envelope(request, keyring=self._keyring,
                                         me=self._identity.name, skew_ms=self._skew_ms)
            if opened.envelope.WhichOneof("body") != "command":
                raise InvalidArgument("this spoke accepts only commands")
            answer = await self._memory.once(opened, lambda: self._answer(opened))
        except FleetwireError as err:
            # Only the outer key_id is named: unverified bytes are never parsed.
            await self._trail.record(AuditEntry(
                action="envelope", outcome=REFUSED, target=f"key_id {request.key_id[:32]}",
                reason=err.message))
            await abort(context, err)
        return wire_pb2.SignedEnvelope.FromString(answer)

    async def _answer(self, opened: OpenedEnvelope) -> bytes:
        env = opened.envelope
        response = await self._commands.handle(env.sender, env.command, env.message_id)
        sealed = seal_envelope(self._identity, recipient=env.sender, response=response,
                               in_reply_to=env.message_id)
        return sealed.SerializeToString()
