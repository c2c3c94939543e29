"""The hub's peer API: spokes deliver signed status reports and heartbeats.

The shared inbox applies the wire rules and replay memory; here a report is applied to
the registry by (spoke, agent, seq) and a heartbeat stamps the spoke alive. The signed
Ack that goes back is what lets the spoke delete its outbox entries. A report or
heartbeat is applied in the transaction that records its message id and answer: one
transaction per message.
"""

from __future__ import annotations

import logging

import grpc
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hub.registry import HubRegistry
from shared.audit import ALLOWED, AuditEntry, AuditTrail, append_audit
from shared.db import models
from shared.envelope import OpenedEnvelope, now_ms
from shared.errors import InvalidArgument
from shared.inbox import EnvelopeInbox
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.peers import check_address
from shared.rotation import take_announcement

log = logging.getLogger(__name__)

_ACCEPTS = frozenset({"report", "heartbeat", "key_announcement"})
# Quick changes, made in the transaction that records the message id and answer.
_IN_ONE_TRANSACTION = frozenset({"report", "heartbeat"})


def _in_one_transaction(envelope: wire_pb2.Envelope) -> bool:
    return envelope.WhichOneof("body") in _IN_ONE_TRANSACTION


class HubPeerService(wire_pb2_grpc.HubPeerServiceServicer):
    def __init__(self, inbox: EnvelopeInbox, trail: AuditTrail, registry: HubRegistry) -> None:
        self._inbox = inbox
        self._trail = trail
        self._registry = registry

    async def Deliver(  # noqa: N802 (gRPC method name)
        self, request: wire_pb2.SignedEnvelope, context: grpc.aio.ServicerContext
    ) -> wire_pb2.SignedEnvelope:
        return await self._inbox.deliver(
            request, context, accepts=_ACCEPTS, answer=self._answer,
            in_one_transaction=_in_one_transaction,
            refusal="the hub's peer API takes only status reports, heartbeats and key "
                    "announcements")

    async def _answer(self, opened: OpenedEnvelope,
                      session: AsyncSession | None) -> wire_pb2.Response:
        env = opened.envelope
        if session is None:
            # A key announcement, in a transaction of its own.
            return await take_announcement(self._trail, opened)
        if env.WhichOneof("body") == "report":
            changed = await self._registry.apply_report(session, env.sender,
                                                        list(env.report.updates))
            log.debug("report from %s: %d of %d updates applied", env.sender, changed,
                      len(env.report.updates))
        # Any verified message shows the spoke is alive, not only a heartbeat: a report
        # that arrives first after a restart must not leave the spoke OFFLINE.
        await session.execute(update(models.Peer).where(
            models.Peer.name == env.sender).values(last_heartbeat_ms=now_ms()))
        if env.WhichOneof("body") == "heartbeat" and env.heartbeat.address:
            await self._follow_address(session, env.sender, env.heartbeat.address)
        return wire_pb2.Response(ack=wire_pb2.Ack())

    async def _follow_address(self, session: AsyncSession, spoke: str, address: str) -> None:
        """A spoke says where it listens (it may have restarted on another port). Safe to
        follow: the hub only ever accepts that spoke's pinned certificate there."""
        try:
            check_address(address)
        except InvalidArgument:
            log.warning("spoke %s advertised a malformed address %r; ignored", spoke, address)
            return
        peer = (await session.execute(
            select(models.Peer).where(models.Peer.name == spoke))).scalar_one()
        if peer.address != address:
            log.info("spoke %s now at %s (was %s)", spoke, address, peer.address or "-")
            await append_audit(session, AuditEntry(
                action="peer.address", outcome=ALLOWED, peer=spoke, target=address,
                reason=f"advertised in a heartbeat (was {peer.address or 'unset'})"))
            peer.address = address
