"""The hub's peer API: spokes deliver signed status reports and heartbeats.

The shared inbox applies the wire rules and replay memory; here a report is applied to
the registry by (spoke, agent, seq) and a heartbeat stamps the spoke alive. The signed
Ack that goes back is what lets the spoke delete its outbox entries.
"""

from __future__ import annotations

import logging

import grpc
from sqlalchemy import update

from hub.registry import HubRegistry
from shared.audit import AuditTrail
from shared.db import models
from shared.envelope import OpenedEnvelope, now_ms
from shared.inbox import EnvelopeInbox
from shared.pb.v1 import wire_pb2, wire_pb2_grpc

log = logging.getLogger(__name__)

_REPORTS = frozenset({"report", "heartbeat"})


class HubPeerService(wire_pb2_grpc.HubPeerServiceServicer):
    def __init__(self, inbox: EnvelopeInbox, trail: AuditTrail, registry: HubRegistry) -> None:
        self._inbox = inbox
        self._trail = trail
        self._registry = registry

    async def Deliver(  # noqa: N802 (gRPC method name)
        self, request: wire_pb2.SignedEnvelope, context: grpc.aio.ServicerContext
    ) -> wire_pb2.SignedEnvelope:
        return await self._inbox.deliver(
            request, context, accepts=_REPORTS, answer=self._answer,
            refusal="the hub's peer API takes only status reports and heartbeats")

    async def _answer(self, opened: OpenedEnvelope) -> wire_pb2.Response:
        env = opened.envelope
        if env.WhichOneof("body") == "report":
            changed = await self._registry.apply_report(env.sender, list(env.report.updates))
            log.debug("report from %s: %d of %d updates applied", env.sender, changed,
                      len(env.report.updates))
        # Any verified message shows the spoke is alive, not only a heartbeat: a report
        # that arrives first after a restart must not leave the spoke OFFLINE.
        async with self._trail.transaction() as session:
            await session.execute(update(models.Peer).where(
                models.Peer.name == env.sender).values(last_heartbeat_ms=now_ms()))
        return wire_pb2.Response(ack=wire_pb2.Ack())
