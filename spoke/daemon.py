"""`fleetwire spoke run`: the spoke daemon."""

from __future__ import annotations

import asyncio
import logging

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.audit import AuditTrail
from shared.config import Config
from shared.daemon import (
    add_health,
    add_reflection,
    advertised,
    announce,
    peer_certs,
    serve_until_stopped,
)
from shared.db.engine import dispose, make_engine, make_sessions
from shared.identity import load_identity
from shared.inbox import EnvelopeInbox
from shared.metrics import AGENT_STATES, Metrics, Reading, by_label, single
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.peers import DbKeyring
from shared.replay import MessageMemory
from shared.rotation import KeyAnnouncer
from shared.rpc import Listen, refuse_plaintext_off_loopback, start_server
from shared.security_view import SecurityView
from spoke.commands import SpokeCommands
from spoke.isolation import Isolation, check_uid_range, choose
from spoke.isolation import record as record_isolation
from spoke.launcher import Launcher
from spoke.reporter import StatusReporter
from spoke.sandbox import FULL, NONE
from spoke.service import SpokeService
from spoke.store import agents_by_state, outbox_depth
from spoke.supervisor import raise_open_file_limit

log = logging.getLogger(__name__)

# Under the home: the launcher's lock and each supervisor's run folder.
RUN_DIR = "run"


def announce_isolation(isolation: Isolation) -> None:
    if isolation.refusal:
        log.error("AGENTS CANNOT START ON THIS SPOKE: %s", isolation.refusal)
    elif isolation.level == NONE:
        log.warning("ISOLATION IS OFF: agents run as plain processes of the spoke's user "
                    "and can read its keys, its database and every other agent's files "
                    "([spoke] isolation = \"none\")")
    else:
        log.info("agents are isolated: %s%s", isolation.level,
                 f" (not more: {isolation.limited_by})" if isolation.limited_by else "")


async def run_spoke(cfg: Config, listen: str, *, insecure: bool = False,
                    advertise: str = "", metrics_listen: str = "") -> None:
    # Everything that can refuse the start comes before anything that acts (adopting
    # agents, making cgroups).
    identity = load_identity(cfg.name, cfg.key_path)
    if insecure:
        refuse_plaintext_off_loopback(listen, "the spoke's command API")
    metrics = Metrics()
    metrics_at = metrics.serve(metrics_listen) if metrics_listen else ""
    log.info("open files: at most %d (one per live agent is held)", raise_open_file_limit())
    engine = make_engine(cfg.db_url)
    sessions = make_sessions(engine)
    certs = await peer_certs(cfg, sessions, insecure)
    trail = AuditTrail(sessions)
    memory = MessageMemory(sessions, trail.write_lock)
    # One view of keys, grants and workspaces for everything this daemon checks.
    view = SecurityView(sessions)
    keyring = DbKeyring(sessions, view=view)
    launcher = Launcher(cfg.home / RUN_DIR, cfg.spoke.agent_uid_base)
    try:
        # No supervisor of a previous run may be starting while recover() looks.
        await launcher.fence()
        isolation = choose(cfg, await launcher.start())
        if isolation.level == FULL:
            check_uid_range(cfg)
    except BaseException:
        await launcher.close()
        await metrics.close()
        raise
    announce_isolation(isolation)
    record_isolation(launcher.run_dir, isolation)
    commands = SpokeCommands(cfg, sessions, trail, metrics, view, launcher, isolation)
    await launcher.configure(commands.side)
    inbox = EnvelopeInbox(identity, keyring, memory, trail, metrics,
                          skew_ms=cfg.wire.max_clock_skew_seconds * 1000,
                          mutual_tls=certs is not None, view=view)
    service = SpokeService(inbox, commands, trail, metrics)
    metrics.read_gauges(lambda: _gauges(sessions))
    try:
        # Before serving: a kill must find the agents it re-adopts.
        await commands.recover()
        server, (port,) = await start_server([
            Listen(listen, certs.mutual_tls() if certs is not None else None),
        ], [
            lambda s: wire_pb2_grpc.add_SpokeServiceServicer_to_server(service, s),
            lambda s: add_health(s, "fleetwire.v1.SpokeService"),
            lambda s: add_reflection(s, [
                wire_pb2.DESCRIPTOR.services_by_name["SpokeService"].full_name]),
        ], cfg.keepalive)
    except BaseException:
        commands.cgroups.close()
        await launcher.close()
        await metrics.close()
        raise
    announce("spoke", cfg, listen.rpartition(":")[0], port, metrics=metrics_at)
    reporter = StatusReporter(cfg, identity, keyring, sessions, trail, certs,
                              advertise=advertised(listen, port, advertise),
                              isolation=isolation.describe())
    reporting = asyncio.create_task(reporter.run(), name="status-reporter")
    announcer = KeyAnnouncer(cfg, identity, keyring, sessions, trail,
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
        await launcher.close()
        await metrics.close()
        await dispose(engine)

    await serve_until_stopped(server, memory, cfg, on_stop, end_streams=service.stop_streams)


async def _gauges(sessions: async_sessionmaker[AsyncSession]) -> list[Reading]:
    async with sessions() as session:
        return [
            by_label("fleetwire_agents", "Agents on this spoke, by state.", "state",
                     AGENT_STATES, await agents_by_state(session)),
            single("fleetwire_outbox_depth", "Status reports waiting to be sent to a hub.",
                   await outbox_depth(session)),
        ]
