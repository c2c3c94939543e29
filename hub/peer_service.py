"""The hub's peer API: spokes deliver signed status reports and heartbeats.

The same wire rules as every envelope (verify the exact bytes, sender, key, recipient,
skew; replay memory), then the report is applied to the registry by (spoke, agent, seq)
and a signed Ack goes back. The spoke deletes its outbox entries only on that Ack.
"""

from __future__ import annotations

import logging

import grpc
from sqlalchemy import update

from hub.registry import HubRegistry
from shared.audit import REFUSED, AuditEntry, AuditTrail
from shared.config import Config
from shared.db import models
from shared.envelope import Keyring, OpenedEnvelope, now_ms, open_envelope, seal_envelope
from shared.errors import FleetwireError, InvalidArgument, abort
from shared.identity import Identity
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.replay import MessageMemory

log = logging.getLogger(__name__)


class HubPeerService(wire_pb2_grpc.HubPeerServiceServicer):
    def __init__(self, cfg: Config, identity: Identity, keyring: Keyring,
                 memory: MessageMemory, trail: AuditTrail, registry: HubRegistry) -> None:
        self._cfg = cfg
        self._identity = identity
        self._keyring = keyring
        self._memory = memory
        self._trail = trail
        self._registry = registry

    async def Deliver(  # noqa: N802 (gRPC method name)
        self, request: wire_pb2.SignedEnvelope, context: grpc.aio.ServicerContext
    ) -> wire_pb2.SignedEnvelope:
        try:
            opened = await open_envelope(
                request, keyring=self._keyring, me=self._identity.name,
                skew_ms=self._cfg.wire.max_clock_skew_seconds * 1000)
            if opened.envelope.WhichOneof("body") not in ("report", "heartbeat"):
                raise InvalidArgument("the hub's peer API takes only status reports and "
                                      "heartbeats")
            answer = await self._memory.once(opened, lambda: self._answer(opened))
        except FleetwireError as err:
            await self._trail.record(AuditEntry(
                action="envelope", outcome=REFUSED, target=f"key_id {request.key_id[:32]}",
                reason=err.message))
            await abort(context, err)
        return wire_pb2.SignedEnvelope.FromString(answer)

    async def _answer(self, opened: OpenedEnvelope) -> bytes:
        env = opened.envelope
        if env.WhichOneof("body") == "heartbeat":
            async with self._trail.transaction() as session:
                await session.execute(update(models.Peer).where(
                    models.Peer.name == env.sender).values(last_heartbeat_ms=now_ms()))
        else:
            changed = await self._registry.apply_report(env.sender, list(env.report.updates))
            log.debug("report from %s: %d of %d updates applied", env.sender, changed,
                      len(env.report.updates))
        sealed = seal_envelope(self._identity, recipient=env.sender,
                               response=wire_pb2.Response(ack=wire_pb2.Ack()),
                               in_reply_to=env.message_id)
        return sealed.SerializeToString()
