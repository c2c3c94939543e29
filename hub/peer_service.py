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
from sqlalchemy import bindparam, select, update

from hub.registry import HubRegistry
from shared.audit import ALLOWED, AuditEntry, AuditTrail, add_audit
from shared.db import models
from shared.db.direct import Statements
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


# A spoke heard from; where it says it listens, and a move of that. Built once.
_NAMED = models.Peer.name == bindparam("b_name")
_HEARD_FROM = update(models.Peer).where(_NAMED).values(last_heartbeat_ms=bindparam("b_now"))
_ADDRESS = select(models.Peer.address).where(_NAMED)
_MOVED = update(models.Peer).where(_NAMED).values(address=bindparam("b_address"))
_ISOLATION = select(models.Peer.isolation).where(_NAMED)
_ISOLATED = update(models.Peer).where(_NAMED).values(isolation=bindparam("b_isolation"))


class HubPeerService(wire_pb2_grpc.HubPeerServiceServicer):
    def __init__(self, inbox: EnvelopeInbox, trail: AuditTrail, registry: HubRegistry) -> None:
        self._inbox = inbox
        self._trail = trail
        self._registry = registry

    async def Deliver(  # noqa: N802 (gRPC method name)
        self, request: wire_pb2.SignedEnvelope, context: grpc.aio.ServicerContext
    ) -> wire_pb2.SignedEnvelope:
        return await self._inbox.deliver(
            request, context, accepts=_ACCEPTS, answer=self._announced,
            in_one_transaction=_in_one_transaction, answer_within=self._within,
            refusal="the hub's peer API takes only status reports, heartbeats and key "
                    "announcements")

    async def _announced(self, opened: OpenedEnvelope) -> wire_pb2.Response:
        """A key announcement, in a transaction of its own."""
        return await take_announcement(self._trail, opened)

    def _within(self, opened: OpenedEnvelope, tx: Statements) -> wire_pb2.Response:
        """A report or heartbeat, applied in the transaction that records it."""
        env = opened.envelope
        if env.WhichOneof("body") == "report":
            changed = self._registry.apply_report(tx, env.sender, list(env.report.updates))
            log.debug("report from %s: %d of %d updates applied", env.sender, changed,
                      len(env.report.updates))
        # Any verified message shows the spoke is alive, not only a heartbeat: a report
        # that arrives first after a restart must not leave the spoke OFFLINE.
        tx.run(_HEARD_FROM, {"b_name": env.sender, "b_now": now_ms()})
        if env.WhichOneof("body") == "heartbeat":
            if env.heartbeat.address:
                _follow_address(tx, env.sender, env.heartbeat.address)
            _note_isolation(tx, env.sender, env.heartbeat.isolation)
        return wire_pb2.Response(ack=wire_pb2.Ack())


def _note_isolation(tx: Statements, spoke: str, isolation: str) -> None:
    """Keep what the spoke says it gives its agents (written only when it changes)."""
    isolation = isolation[:16]
    row = tx.first(_ISOLATION, {"b_name": spoke})
    if row is not None and row[0] != isolation:
        log.info("spoke %s gives its agents isolation %r (was %r)", spoke, isolation,
                 row[0])
        tx.run(_ISOLATED, {"b_name": spoke, "b_isolation": isolation})


def _follow_address(tx: Statements, spoke: str, address: str) -> None:
    """A spoke says where it listens (it may have restarted on another port). Safe to
    follow: the hub only ever accepts that spoke's pinned certificate there."""
    try:
        check_address(address)
    except InvalidArgument:
        log.warning("spoke %s advertised a malformed address %r; ignored", spoke, address)
        return
    row = tx.first(_ADDRESS, {"b_name": spoke})
    was = row[0] if row is not None else ""
    if row is not None and was != address:
        log.info("spoke %s now at %s (was %s)", spoke, address, was or "-")
        add_audit(tx, AuditEntry(
            action="peer.address", outcome=ALLOWED, peer=spoke, target=address,
            reason=f"advertised in a heartbeat (was {was or 'unset'})"))
        tx.run(_MOVED, {"b_name": spoke, "b_address": address})
