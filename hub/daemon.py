"""`fleetwire hub run`: the hub daemon."""

from __future__ import annotations

from hub.dispatch import SpokeDispatcher
from hub.events import AgentEvents
from hub.operator import HubOperator
from hub.peer_service import HubPeerService
from hub.registry import HubRegistry
from hub.service import OperatorService
from shared.audit import AuditTrail
from shared.config import Config
from shared.daemon import add_health, announce, serve_until_stopped
from shared.db.engine import make_engine, make_sessions
from shared.identity import load_identity
from shared.inbox import EnvelopeInbox
from shared.pb.v1 import operator_pb2_grpc, wire_pb2_grpc
from shared.peers import DbKeyring
from shared.replay import MessageMemory
from shared.rpc import start_server


async def run_hub(cfg: Config, listen: str) -> None:
    identity = load_identity(cfg.name, cfg.key_path)
    engine = make_engine(cfg.db_url)
    sessions = make_sessions(engine)
    keyring = DbKeyring(sessions)
    dispatcher = SpokeDispatcher(cfg, identity, keyring)
    trail = AuditTrail(sessions)
    memory = MessageMemory(sessions)
    registry = HubRegistry(trail, AgentEvents())
    service = OperatorService(trail, HubOperator(cfg, trail, dispatcher, registry))
    inbox = EnvelopeInbox(identity, keyring, memory, trail,
                          skew_ms=cfg.wire.max_clock_skew_seconds * 1000)
    peers = HubPeerService(inbox, trail, registry)
    server, port = await start_server(listen, [
        lambda s: operator_pb2_grpc.add_OperatorServiceServicer_to_server(service, s),
        lambda s: wire_pb2_grpc.add_HubPeerServiceServicer_to_server(peers, s),
        lambda s: add_health(s, "fleetwire.v1.OperatorService"),
    ], cfg.keepalive)
    announce("hub", cfg, listen.rpartition(":")[0], port)

    async def on_stop() -> None:
        await dispatcher.close()
        await engine.dispose()

    await serve_until_stopped(server, memory, cfg, on_stop)
