"""`fleetwire hub run`: the hub daemon."""

from __future__ import annotations

import asyncio

from hub.dispatch import SpokeDispatcher
from hub.events import AgentEvents
from hub.join import JoinService
from hub.liveness import ONLINE
from hub.operator import HubOperator
from hub.peer_service import HubPeerService
from hub.registry import HubRegistry
from hub.service import OperatorService
from shared.audit import AuditTrail
from shared.config import Config
from shared.daemon import (
    add_health,
    add_reflection,
    announce,
    peer_certs,
    serve_until_stopped,
    with_port,
)
from shared.db.engine import dispose, make_engine, make_sessions
from shared.errors import InvalidArgument
from shared.identity import load_identity
from shared.inbox import EnvelopeInbox
from shared.metrics import AGENT_STATES, SPOKE_STATES, Metrics, Reading, by_label, single
from shared.pb.v1 import operator_pb2, operator_pb2_grpc, wire_pb2, wire_pb2_grpc
from shared.peers import DbKeyring
from shared.replay import MessageMemory
from shared.rotation import KeyAnnouncer
from shared.rpc import Listen, refuse_plaintext_off_loopback, start_server
from shared.security_view import SecurityView
from shared.tls import is_loopback


async def run_hub(cfg: Config, listen: str, peer_listen: str, *, insecure: bool = False,
                  operator_tls: bool = False, metrics_listen: str = "") -> None:
    """Serve operators on `listen` (TLS unless it is loopback and operator_tls is off)
    and spokes on `peer_listen` (mutual TLS unless insecure); with metrics_listen,
    Prometheus metrics over HTTP there."""
    identity = load_identity(cfg.name, cfg.key_path)
    if insecure:
        refuse_plaintext_off_loopback(peer_listen, "the hub's peer API")
        if operator_tls:
            raise InvalidArgument("--operator-tls needs TLS; drop --insecure")
    metrics = Metrics()
    metrics_at = metrics.serve(metrics_listen) if metrics_listen else ""
    engine = make_engine(cfg.db_url)
    sessions = make_sessions(engine)
    certs = await peer_certs(cfg, sessions, insecure)
    operator_creds = None
    if certs is not None and (operator_tls or not is_loopback(listen)):
        operator_creds = certs.server_tls()
    elif not is_loopback(listen):
        refuse_plaintext_off_loopback(listen, "the hub's operator API")
    # One view of keys and tokens for everything this daemon checks.
    view = SecurityView(sessions)
    keyring = DbKeyring(sessions, view=view)
    dispatcher = SpokeDispatcher(cfg, identity, keyring, certs, metrics)
    trail = AuditTrail(sessions)
    memory = MessageMemory(sessions, trail.write_lock)
    registry = HubRegistry(trail, AgentEvents())
    operator = HubOperator(cfg, trail, dispatcher, registry)
    service = OperatorService(trail, operator, metrics, view)
    inbox = EnvelopeInbox(identity, keyring, memory, trail, metrics,
                          skew_ms=cfg.wire.max_clock_skew_seconds * 1000,
                          mutual_tls=certs is not None, view=view)
    peers = HubPeerService(inbox, trail, registry)

    async def gauges() -> list[Reading]:
        spokes = await operator.spoke_statuses()
        return [
            by_label("fleetwire_agents", "Agents in the hub's registry, by last known state.",
                     "state", AGENT_STATES, await registry.count_by_state()),
            by_label("fleetwire_spokes", "Active spokes, by liveness.", "state",
                     SPOKE_STATES, spokes),
            single("fleetwire_spokes_online", "Spokes whose heartbeats are current.",
                   spokes.get(ONLINE, 0)),
        ]

    metrics.read_gauges(gauges)
    bound: dict[str, int] = {}
    joins = (JoinService(trail, identity, certs.own, lambda: bound["peer_port"], certs.refresh)
             if certs is not None else None)
    # One server, two ports: operators (bearer tokens; server TLS off loopback) and
    # peers (mutual TLS). Each service is reachable on both, but a peer's envelope is
    # refused without a pinned client certificate, and operators need a token anyway.
    server, (port, peer_port) = await start_server([
        Listen(listen, operator_creds),
        Listen(peer_listen, certs.mutual_tls() if certs is not None else None),
    ], [
        lambda s: operator_pb2_grpc.add_OperatorServiceServicer_to_server(service, s),
        lambda s: wire_pb2_grpc.add_HubPeerServiceServicer_to_server(peers, s),
        lambda s: wire_pb2_grpc.add_JoinServiceServicer_to_server(
            joins or wire_pb2_grpc.JoinServiceServicer(), s),
        lambda s: add_health(s, "fleetwire.v1.OperatorService"),
        lambda s: add_reflection(s, [
            operator_pb2.DESCRIPTOR.services_by_name["OperatorService"].full_name,
            *(wire_pb2.DESCRIPTOR.services_by_name[name].full_name
              for name in ("HubPeerService", "JoinService"))]),
    ], cfg.keepalive)
    bound["peer_port"] = peer_port
    announce("hub", cfg, listen.rpartition(":")[0], port,
             peers=with_port(peer_listen, peer_port), metrics=metrics_at)
    refreshing = (asyncio.create_task(certs.keep_fresh(), name="peer-certs")
                  if certs is not None else None)
    announcer = KeyAnnouncer(cfg, identity, keyring, sessions, trail, dispatcher.channels,
                             wire_pb2_grpc.SpokeServiceStub)
    announcing = asyncio.create_task(announcer.run(), name="key-announcer")

    async def on_stop() -> None:
        announcing.cancel()
        if refreshing is not None:
            refreshing.cancel()
        await dispatcher.close()
        await metrics.close()
        await registry.close()
        await dispose(engine)

    await serve_until_stopped(server, memory, cfg, on_stop)
