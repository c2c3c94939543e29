"""The hub's registry of agents it spawned: where each lives and its latest known state.

Operator reads go through the active scope's tenant. Updates come from two places, live
answers and spokes' status reports, and both go through `_apply`, which orders them by
the agent's seq so nothing ever moves an agent backwards.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import and_, bindparam, func, insert, or_, select, update

from hub.events import AgentEvents
from shared.audit import ALLOWED, REFUSED, AuditEntry, AuditTrail, add_audit
from shared.db import models
from shared.db.direct import Statements, mapped_columns, to_model
from shared.envelope import now_ms
from shared.pb.v1 import wire_pb2
from shared.peers import ACTIVE
from shared.scope import current_scope

log = logging.getLogger(__name__)


def state_name(agent: wire_pb2.Agent) -> str:
    return wire_pb2.AgentState.Name(agent.state).removeprefix("AGENT_STATE_")


def known_agent(row: models.HubAgent) -> wire_pb2.Agent:
    """What the registry knows of an agent, as a wire Agent named after its spoke."""
    agent = (wire_pb2.Agent.FromString(row.snapshot) if row.snapshot else wire_pb2.Agent(
        agent_id=row.agent_id, tenant=row.tenant, workspace=row.workspace,
        template=row.template, principal=row.principal,
        state=f"AGENT_STATE_{row.state}", reason="spawn sent; no answer from the spoke yet"))
    agent.spoke = row.spoke
    agent.reported_at_ms = row.reported_at_ms or 0
    return agent


# An answer that brings nothing newer than the registry has (most live status answers):
# only the time it was heard changes. One statement, where _apply reads the row first.
_HEARD_AGAIN = (
    update(models.HubAgent)
    .where(models.HubAgent.agent_id == bindparam("b_agent"),
           models.HubAgent.spoke == bindparam("b_spoke"),
           models.HubAgent.tenant == bindparam("b_tenant"),
           models.HubAgent.report_seq >= bindparam("b_seq"),
           models.HubAgent.snapshot.is_not(None))
    .values(reported_at_ms=bindparam("b_now")))


def _heard_again(tx: Statements, spoke: str, agent: wire_pb2.Agent) -> bool:
    """Stamp the agent as heard from now if the answer is not newer than what the
    registry holds; False if it is (or the agent is not there as that spoke's)."""
    return tx.run(_HEARD_AGAIN, {
        "b_agent": agent.agent_id, "b_spoke": spoke, "b_tenant": agent.tenant,
        "b_seq": agent.seq, "b_now": now_ms()}) == 1


# An agent by id in a tenant, with its spoke if that one may be asked (active, with an
# address); asked on every status, kill and logs request, built once.
_AGENT_KEYS, _AGENT_COLUMNS = mapped_columns(models.HubAgent)
_PEER_KEYS, _PEER_COLUMNS = mapped_columns(models.Peer)
_PEER_NAME = _PEER_KEYS.index("name")
_AGENT_AND_SPOKE = (
    select(*_AGENT_COLUMNS, *_PEER_COLUMNS)
    .join(models.Peer, and_(models.Peer.name == models.HubAgent.spoke,
                            models.Peer.state == ACTIVE, models.Peer.address != ""),
          isouter=True)
    .where(models.HubAgent.agent_id == bindparam("b_agent"),
           models.HubAgent.tenant == bindparam("b_tenant")))


# An agent's row, locked until commit where the database can (PostgreSQL); a new row,
# and a change of one (the columns set are the parameters besides b_agent). Built once.
_ROW_FOR_UPDATE = (select(*_AGENT_COLUMNS)
                   .where(models.HubAgent.agent_id == bindparam("b_agent"))
                   .with_for_update())
_ADD_AGENT = insert(models.HubAgent)
_CHANGE_AGENT = update(models.HubAgent).where(models.HubAgent.agent_id == bindparam("b_agent"))


# "Heard from now" stamps of live answers that brought nothing new, written together.
_STAMP = (
    update(models.HubAgent)
    .where(models.HubAgent.agent_id == bindparam("b_agent"),
           models.HubAgent.spoke == bindparam("b_spoke"),
           models.HubAgent.tenant == bindparam("b_tenant"),
           or_(models.HubAgent.reported_at_ms.is_(None),
               models.HubAgent.reported_at_ms < bindparam("b_now")))
    .values(reported_at_ms=bindparam("b_now")))
# How long such a stamp may wait for others to be written with.
STAMP_DELAY_SECONDS = 0.2


class HubRegistry:
    def __init__(self, trail: AuditTrail, events: AgentEvents) -> None:
        self._trail = trail
        self.events = events
        # agent_id -> (spoke, tenant, heard at), waiting to be written.
        self._stamps: dict[str, tuple[str, str, int]] = {}
        self._writing: asyncio.Task[None] | None = None

    def heard(self, spoke: str, agent: wire_pb2.Agent) -> None:
        """Note that spoke answered about agent with nothing newer than the registry
        holds: only the time it was last heard from changes. Written within
        STAMP_DELAY_SECONDS, with every other stamp of that time, in one transaction
        (a live status then writes nothing while its caller waits)."""
        self._stamps[agent.agent_id] = (spoke, agent.tenant, now_ms())
        if self._writing is None or self._writing.done():
            self._writing = asyncio.create_task(self._write_stamps_soon(),
                                                name="registry-stamps")

    async def _write_stamps_soon(self) -> None:
        await asyncio.sleep(STAMP_DELAY_SECONDS)
        await self.write_stamps()

    async def close(self) -> None:
        """Write what waits, at shutdown."""
        if self._writing is not None and not self._writing.done():
            self._writing.cancel()
            await asyncio.gather(self._writing, return_exceptions=True)
        await self.write_stamps()

    async def write_stamps(self) -> None:
        """Write the waiting stamps now (also at shutdown). A stamp never moves a time
        back, and touches only the row of that agent on that spoke in that tenant."""
        stamps, self._stamps = self._stamps, {}
        if not stamps:
            return
        try:
            async with self._trail.transaction() as session:
                conn = await session.connection()
                await conn.execute(_STAMP, [
                    {"b_agent": agent_id, "b_spoke": spoke, "b_tenant": tenant, "b_now": at}
                    for agent_id, (spoke, tenant, at) in stamps.items()])
        except Exception:
            # Only the last-heard times are lost; the next answer stamps them again.
            log.exception("writing %d last-heard stamps failed", len(stamps))

    async def find_with_spoke(self, agent_id: str
                              ) -> tuple[models.HubAgent, models.Peer | None] | None:
        """An agent of the active tenant and its spoke's record (None if that spoke is
        not active or has no address), in one statement. Detached copies, for reading."""
        row = await self._trail.direct.first(_AGENT_AND_SPOKE, {
            "b_agent": agent_id, "b_tenant": current_scope().tenant})
        if row is None:
            return None
        split = len(_AGENT_KEYS)
        agent = to_model(models.HubAgent, _AGENT_KEYS, row[:split])
        peer = row[split:]
        # The outer join's peer columns are all NULL when the spoke is not there.
        return agent, (None if peer[_PEER_NAME] is None
                       else to_model(models.Peer, _PEER_KEYS, peer))

    async def visible(self, *, spoke: str = "", workspace: str = "") -> list[models.HubAgent]:
        """The active tenant's agents, optionally on one spoke or in one workspace."""
        query = select(models.HubAgent).where(models.HubAgent.tenant == current_scope().tenant)
        if spoke:
            query = query.where(models.HubAgent.spoke == spoke)
        if workspace:
            query = query.where(models.HubAgent.workspace == workspace)
        async with self._trail.reader() as session:
            return list((await session.execute(
                query.order_by(models.HubAgent.updated_at_ms))).scalars())

    async def count_by_state(self) -> dict[str, int]:
        """How many agents the registry holds in each state, all tenants (for metrics,
        never for an operator)."""
        async with self._trail.reader() as session:
            rows = await session.execute(
                select(models.HubAgent.state, func.count()).group_by(models.HubAgent.state))
            return {state: int(count) for state, count in rows.tuples()}

    async def record_pending(self, *, agent_id: str, spoke: str, workspace: str,
                             template: str, message_id: str) -> None:
        scope = current_scope()
        row = _new_row(agent_id=agent_id, spoke=spoke, tenant=scope.tenant,
                       workspace=workspace, template=template,
                       principal=scope.principal.name, spawn_message_id=message_id)

        def record(tx: Statements) -> None:
            # A retried spawn (same idempotency key, same agent id) may find the agent
            # recorded already, by its first attempt's report.
            if tx.first(_ROW_FOR_UPDATE, {"b_agent": agent_id}) is None:
                tx.run(_ADD_AGENT, row)

        await self._trail.apply(record)

    async def forget(self, agent_id: str) -> None:
        scope = current_scope()
        async with self._trail.transaction() as session:
            row = (await session.execute(
                select(models.HubAgent).where(models.HubAgent.agent_id == agent_id,
                                              models.HubAgent.tenant == scope.tenant)
            )).scalar_one_or_none()
            if row is not None:
                await session.delete(row)

    async def observe(self, spoke: str, agent: wire_pb2.Agent,
                      audit: AuditEntry | None = None) -> None:
        """Remember a spoke's live answer about an agent of the active tenant; with audit,
        record the change the operator asked for in the same transaction."""
        if agent.tenant != current_scope().tenant:
            return

        def observe(tx: Statements) -> wire_pb2.Agent | None:
            if audit is None and _heard_again(tx, spoke, agent):
                return None
            applied = _apply(tx, spoke, agent, adopt_unknown=True)
            if audit is not None:
                add_audit(tx, audit)
            return applied

        self._publish([await self._trail.apply(observe)])

    def apply_report(self, tx: Statements, spoke: str,
                     updates: list[wire_pb2.AgentUpdate]) -> int:
        """Apply a spoke's status report among tx's statements (an AuditTrail.apply
        transaction); returns how many updates changed something. An agent the registry
        has must be on that spoke in its recorded tenant; one it does not have (its
        spawn was not recorded here: a lost or restored hub database) is taken in when
        its tenant is one of this hub's, audited. Watchers hear of the changes once
        committed."""
        applied = []
        for change in updates:
            agent = wire_pb2.Agent()
            agent.CopyFrom(change.agent)
            agent.seq = change.seq
            applied.append(_apply(tx, spoke, agent, adopt_unknown=_adoptable))
        tx.after_commit(lambda: self._publish(applied))
        return sum(a is not None for a in applied)

    def _publish(self, applied: list[wire_pb2.Agent | None]) -> None:
        """Tell watchers, once the changes are committed."""
        for agent in applied:
            if agent is not None:
                self.events.publish(agent)


_TENANT = select(models.Tenant.id).where(models.Tenant.slug == bindparam("b_tenant"))


def _adoptable(tx: Statements, spoke: str, agent: wire_pb2.Agent) -> bool:
    """Whether an agent a spoke reports, which the registry has no record of, can be
    taken in: its tenant is one of this hub's. Audited either way."""
    known_tenant = tx.first(_TENANT, {"b_tenant": agent.tenant}) is not None
    add_audit(tx, AuditEntry(
        action="agent.adopt", outcome=ALLOWED if known_tenant else REFUSED,
        tenant=agent.tenant, workspace=agent.workspace, peer=spoke, target=agent.agent_id,
        reason=(f"reported by spoke '{spoke}', which runs it for this hub; the registry "
                f"had no record of it (state {state_name(agent)})" if known_tenant else
                f"reported by spoke '{spoke}' in tenant '{agent.tenant}', which this hub "
                "does not keep")))
    if known_tenant:
        log.warning("spoke %s reported agent %s, which the registry had no record of; "
                    "taken in", spoke, agent.agent_id)
    return known_tenant


def _new_row(**values: Any) -> dict[str, Any]:
    """Every column of a new registry row: an agent spawned, not heard of yet."""
    return {"state": "PENDING", "updated_at_ms": now_ms(), "snapshot": None,
            "report_seq": 0, "reported_at_ms": None, **values}


def _apply(tx: Statements, spoke: str, agent: wire_pb2.Agent, *,
           adopt_unknown: bool | Callable[[Statements, str, wire_pb2.Agent], bool]
           ) -> wire_pb2.Agent | None:
    """Store agent if it is newer than what the registry has; return what changed. An
    agent the registry does not have is added if adopt_unknown (or what it says of
    it)."""
    # Locked until commit: a second hub process on the same database applying another
    # report of this agent waits, then sees this one's sequence number.
    found = tx.first(_ROW_FOR_UPDATE, {"b_agent": agent.agent_id})
    if found is None:
        adopt = adopt_unknown(tx, spoke, agent) if callable(adopt_unknown) else adopt_unknown
        if not adopt:
            return None
        row = _new_row(agent_id=agent.agent_id, spoke=spoke, tenant=agent.tenant,
                       workspace=agent.workspace, template=agent.template,
                       principal=agent.principal, spawn_message_id="")
    else:
        row = dict(zip(_AGENT_KEYS, found, strict=True))
    if row["spoke"] != spoke or row["tenant"] != agent.tenant:
        log.warning("spoke %s reported agent %s, which belongs elsewhere; ignored",
                    spoke, agent.agent_id)
        return None
    row["reported_at_ms"] = now_ms()
    changed = ["reported_at_ms"]
    if agent.seq > row["report_seq"] or row["snapshot"] is None:
        stored = wire_pb2.Agent()
        stored.CopyFrom(agent)
        stored.spoke, stored.stale, stored.reported_at_ms = "", False, 0
        row.update(snapshot=stored.SerializeToString(),
                   report_seq=max(agent.seq, row["report_seq"]), state=state_name(agent),
                   updated_at_ms=now_ms())
        changed += ["snapshot", "report_seq", "state", "updated_at_ms"]
    if found is None:
        tx.run(_ADD_AGENT, row)
    else:
        tx.run(_CHANGE_AGENT, {"b_agent": agent.agent_id, **{k: row[k] for k in changed}})
    if len(changed) == 1:
        return None  # a duplicate or late report: never move backwards
    return known_agent(to_model(models.HubAgent, _AGENT_KEYS,
                                [row[key] for key in _AGENT_KEYS]))
