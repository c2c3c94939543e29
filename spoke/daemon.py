"""`fleetwire spoke run`: the spoke daemon."""

from __future__ import annotations

import asyncio

from shared.audit import AuditTrail
from shared.config import Config
from shared.daemon import add_health, advertised, announce, peer_certs, serve_until_stopped
from shared.db.engine import make_engine, make_sessions
from shared.identity import load_identity
from shared.inbox import EnvelopeInbox
from shared.pb.v1 import wire_pb2_grpc
from shared.peers import DbKeyring
from shared.replay import MessageMemory
from shared.rotation import KeyAnnouncer
from shared.rpc import Listen, refuse_plaintext_off_loopback, start_server
from spoke.commands import SpokeCommands
from spoke.reporter import StatusReporter
from spoke.service import SpokeService


async def run_spoke(cfg: Config, listen: str, *, insecure: bool = False,
                    advertise: str = "") -> None:
    # Everything that can refuse the start comes before anything that acts (adopting
    # agents, making cgroups).
    identity = load_identity(cfg.name, cfg.key_path)
    if insecure:
        refuse_plaintext_off_loopback(listen, "the spoke's command API")
    engine = make_engine(cfg.db_url)
    sessions = make_sessions(engine)
    certs = await peer_certs(cfg, sessions, insecure)
    trail = AuditTrail(sessions)
    memory = MessageMemory(sessions, trail.write_lock)
    commands = SpokeCommands(cfg, sessions, trail)
    inbox = EnvelopeInbox(identity, DbKeyring(sessions), memory, trail,
                          skew_ms=cfg.wire.max_clock_skew_seconds * 1000,
                          mutual_tls=certs is not None)
    service = SpokeService(inbox, commands, trail)
    try:
        # Before serving: a kill must find the agents it re-adopts.
        await commands.recover()
        server, (port,) = await start_server([
            Listen(listen, certs.mutual_tls() if certs is not None else None),
        ], [
            lambda s: wire_pb2_grpc.add_SpokeServiceServicer_to_server(service, s),
            lambda s: add_health(s, "fleetwire.v1.SpokeService"),
        ], cfg.keepalive)
    except BaseException:
        commands.cgroups.close()
        raise
    announce("spoke", cfg, listen.rpartition(":")[0], port)
    reporter = StatusReporter(cfg, identity, DbKeyring(sessions), sessions, trail, certs,
                              advertise=advertised(listen, port, advertise))
    reporting = asyncio.create_task(reporter.run(), name="status-reporter")
    announcer = KeyAnnouncer(cfg, identity, DbKeyring(sessions), sessions, trail,
                             reporter.channels, wire_pb2_grpc.HubPeerServiceStub)
    announcing = asyncio.create_task(announcer.run(), name="key-announcer")
    draining = asyncio.create_task(commands.watch_drain(), name="drain-watch")
    refreshing = (asyncio.create_task(certs.keep_fresh(), name="peer-certs")
                  if certs is not None else None)

    async def on_stop() -> None:
        # Agents keep running; a restarted spoke finds them by pid and start time, and
        # what the outbox holds is sent after the restart.
        reporting.cancel()
        announcing.cancel()
        draining.cancel()
        if refreshing is not None:
            refreshing.cancel()
        await reporter.close()
        commands.supervisor.detach()
        commands.cgroups.close()
        await engine.dispose()

    await serve_until_stopped(server, memory, cfg, on_stop)
