"""Status flowing from a spoke to its hubs: the outbox drained as signed reports, and
heartbeats.

Each state change was queued in the outbox in the transaction that made it. The
reporter sends a hub its entries oldest first (of an agent's entries waiting together,
the newest), deletes them once the hub's signed Ack is verified, and retries with
backoff until then; the hub applies each (agent, seq) once. Heartbeats tell the hub
the spoke is alive; the first that gets through after a start or an outage is followed
by a snapshot of every agent of that hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from shared.audit import AuditTrail
from shared.config import Config
from shared.db import models
from shared.envelope import Keyring, open_reply, seal_envelope
from shared.errors import FleetwireError, Unauthenticated
from shared.identity import Identity
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.peers import ACTIVE
from shared.rpc import PeerCerts, PeerChannels
from spoke.store import count_live, to_wire

log = logging.getLogger(__name__)

BATCH = 200
SEND_TIMEOUT_SECONDS = 10.0
# Once a change is queued, how long the reporter waits for more before it sends: one
# signed report then carries what a burst of changes queued (a kill's end, the next
# spawn's start), not one each. The hub learns of a change at most this much later; an
# operator's command gets the new state in its answer at once.
LINGER_SECONDS = 0.1


def newest_per_agent(entries: list[models.OutboxEntry]) -> list[models.OutboxEntry]:
    """Of each agent's entries (given oldest first), the newest, in the order the agents
    first appear. Each entry holds the agent's whole state, and the hub would skip the
    older ones by seq anyway: a spawn of a quick program queues PENDING, RUNNING and its
    end, and one report carries the end."""
    newest: dict[str, models.OutboxEntry] = {}
    for entry in entries:
        newest[entry.agent_id] = entry
    return list(newest.values())


class HubUnreachable(Exception):
    """A hub did not take a report or heartbeat; the caller retries later."""


class StatusReporter:
    def __init__(self, cfg: Config, identity: Identity, keyring: Keyring,
                 sessions: async_sessionmaker[AsyncSession], trail: AuditTrail,
                 certs: PeerCerts | None, advertise: str = "", isolation: str = "") -> None:
        self._cfg = cfg
        self._identity = identity
        self._keyring = keyring
        self._sessions = sessions
        self._trail = trail
        self._channels = PeerChannels(cfg.keepalive, certs)
        # Where hubs reach this spoke, told with every heartbeat ("" if unknown).
        self._advertise = advertise
        # What this spoke gives its agents, told with every heartbeat.
        self._isolation = isolation
        # Hubs that must get a snapshot before anything else (all of them at start).
        self._needs_snapshot: set[str] | None = None

    @property
    def channels(self) -> PeerChannels:
        return self._channels

    async def run(self) -> None:
        """Drain the outbox and send heartbeats until cancelled."""
        await asyncio.gather(self._drain_forever(), self._heartbeat_forever())

    async def close(self) -> None:
        await self._channels.close()

    # -- reports -----------------------------------------------------------------------

    async def _drain_forever(self) -> None:
        while True:
            self._trail.pending.clear()
            more = False
            try:
                async for attempt in AsyncRetrying(
                        retry=retry_if_exception_type(HubUnreachable),
                        wait=wait_exponential(multiplier=0.2, max=self._max_backoff())):
                    with attempt:
                        more = await self.drain_once()
            except Exception:
                log.exception("draining the outbox failed")
            if more:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._trail.pending.wait(),
                                       timeout=self._cfg.spoke.heartbeat_seconds)
            if self._trail.pending.is_set():
                await self._gather()

    async def _gather(self) -> None:
        """Let the rest of a burst of changes queue up: it goes in the same report."""
        await asyncio.sleep(LINGER_SECONDS)

    def _max_backoff(self) -> float:
        return max(1.0, self._cfg.spoke.heartbeat_seconds * 2)

    async def drain_once(self) -> bool:
        """Send the oldest queued entries (up to BATCH) to their hubs; True if that was a
        full batch, so more may be waiting. HubUnreachable if any hub failed."""
        async with self._sessions() as session:
            entries = list((await session.execute(
                select(models.OutboxEntry).order_by(models.OutboxEntry.id).limit(BATCH)
            )).scalars())
        by_hub: dict[str, list[models.OutboxEntry]] = {}
        for entry in entries:
            by_hub.setdefault(entry.hub, []).append(entry)
        failed = []
        for hub, batch in by_hub.items():
            # All of the batch is deleted once the hub acknowledged the newest of each.
            report = wire_pb2.StatusReport(updates=[
                wire_pb2.AgentUpdate(agent=wire_pb2.Agent.FromString(e.payload), seq=e.seq)
                for e in newest_per_agent(batch)])
            try:
                await self._send(hub, report=report)
            except HubUnreachable as exc:
                failed.append(f"{hub}: {exc}")
                continue
            async with self._trail.transaction() as session:
                await session.execute(delete(models.OutboxEntry).where(
                    models.OutboxEntry.id.in_([e.id for e in batch])))
        if failed:
            raise HubUnreachable("; ".join(failed))
        return len(entries) == BATCH

    # -- heartbeats and snapshots ------------------------------------------------------

    async def _heartbeat_forever(self) -> None:
        while True:
            await self.heartbeat_once()
            await asyncio.sleep(self._cfg.spoke.heartbeat_seconds)

    async def heartbeat_once(self) -> None:
        hubs = await self._hubs()
        if self._needs_snapshot is None:
            self._needs_snapshot = set(hubs)
        running = await self._running_count()
        for hub in hubs:
            try:
                await self._send(hub, heartbeat=wire_pb2.Heartbeat(
                    agents_running=running,
                    interval_ms=int(self._cfg.spoke.heartbeat_seconds * 1000),
                    address=self._advertise, isolation=self._isolation))
                if hub in self._needs_snapshot:
                    await self._send(hub, report=await self._snapshot(hub))
                    self._needs_snapshot.discard(hub)
            except HubUnreachable as exc:
                if hub not in self._needs_snapshot:
                    log.warning("hub %s unreachable (%s); a snapshot follows when it is "
                                "back", hub, exc)
                self._needs_snapshot.add(hub)

    async def _snapshot(self, hub: str) -> wire_pb2.StatusReport:
        async with self._sessions() as session:
            agents = list((await session.execute(
                select(models.Agent).where(models.Agent.peer == hub))).scalars())
        return wire_pb2.StatusReport(snapshot=True, updates=[
            wire_pb2.AgentUpdate(agent=to_wire(a), seq=a.report_seq) for a in agents])

    async def _hubs(self) -> list[str]:
        """Peers this spoke reports to: active ones with an address (hubs it knows)."""
        async with self._sessions() as session:
            return list((await session.execute(
                select(models.Peer.name).where(models.Peer.state == ACTIVE,
                                               models.Peer.address != ""))).scalars())

    async def _running_count(self) -> int:
        async with self._sessions() as session:
            return await count_live(session)

    # -- the wire ----------------------------------------------------------------------

    async def _send(self, hub: str, **body: wire_pb2.StatusReport | wire_pb2.Heartbeat
                    ) -> None:
        """Seal, deliver and verify one message to a hub; HubUnreachable on any failure."""
        async with self._sessions() as session:
            address = (await session.execute(
                select(models.Peer.address).where(models.Peer.name == hub,
                                                  models.Peer.state == ACTIVE)
            )).scalar_one_or_none()
        if not address:
            raise HubUnreachable(f"no address for hub '{hub}' (set one with `fleetwire "
                                 "peer add --address`)")
        signed = seal_envelope(self._identity, recipient=hub, **body)  # type: ignore[arg-type]
        message_id = wire_pb2.Envelope.FromString(signed.envelope).message_id
        try:
            stub = wire_pb2_grpc.HubPeerServiceStub(await self._channels.get(hub, address))
        except FleetwireError as exc:
            raise HubUnreachable(exc.message) from None
        try:
            reply = await stub.Deliver(signed, timeout=SEND_TIMEOUT_SECONDS)
            response = await open_reply(
                reply, keyring=self._keyring, me=self._identity.name, peer=hub,
                message_id=message_id, skew_ms=self._cfg.wire.max_clock_skew_seconds * 1000)
        except grpc.aio.AioRpcError as exc:
            raise HubUnreachable(f"{exc.code().name}: {exc.details()}") from None
        except Unauthenticated as exc:
            raise HubUnreachable(f"its answer failed verification: {exc.message}") from None
        except FleetwireError as exc:
            raise HubUnreachable(f"refused: {exc.message}") from None
        if response.WhichOneof("result") != "ack":
            raise HubUnreachable("its answer is not an acknowledgement")



