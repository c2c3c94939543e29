"""Agent rows on a spoke.

`ScopedAgents` is the only way the request path reads or creates agents: every read is
filtered by the active scope's tenant and workspaces (in the query, or on the one row
read by its id). `AgentLedger` records lifecycle changes by agent id for the
supervisor, which acts on agents it already owns. Every change is written with its
audit record in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Select, bindparam, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from shared.audit import ALLOWED, AuditEntry, AuditTrail, add_audit
from shared.db import models
from shared.db.direct import Statements, mapped_columns, to_model
from shared.envelope import now_ms
from shared.errors import ResourceExhausted
from shared.pb.v1 import wire_pb2
from shared.scope import current_scope

FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "KILLED", "TIMED_OUT", "LOST"})
LIVE_STATES = frozenset({"PENDING", "RUNNING"})
# How long an over-quota spawn is told to wait before trying again.
QUOTA_RETRY_AFTER_MS = 5000
_END_ACTIONS = {"SUCCEEDED": "agent.exit", "FAILED": "agent.exit", "KILLED": "agent.kill",
                "TIMED_OUT": "agent.timeout", "LOST": "agent.lost"}


def to_wire(agent: models.Agent) -> wire_pb2.Agent:
    msg = wire_pb2.Agent(
        agent_id=agent.agent_id, tenant=agent.tenant, workspace=agent.workspace,
        template=agent.template, task=agent.task, principal=agent.principal,
        state=f"AGENT_STATE_{agent.state}",
        created_at_ms=agent.created_at_ms, started_at_ms=agent.started_at_ms or 0,
        ended_at_ms=agent.ended_at_ms or 0, reason=agent.reason, seq=agent.report_seq,
    )
    if agent.exit_code is not None:
        msg.exit_code = agent.exit_code
    return msg


def record_of(agent: models.Agent) -> dict[str, object]:
    """The agent's row as plain values (kept by its supervisor, see spoke/shim.py)."""
    return {key: getattr(agent, key) for key in _AGENT_KEYS}


async def count_live(session: AsyncSession) -> int:
    """How many agents on this spoke are PENDING or RUNNING (all tenants)."""
    return int((await session.execute(_COUNT_LIVE)).scalar_one())


async def agents_by_state(session: AsyncSession) -> dict[str, int]:
    """How many agents this spoke has in each state (all tenants; for metrics)."""
    rows = await session.execute(
        select(models.Agent.state, func.count()).group_by(models.Agent.state))
    return {state: int(count) for state, count in rows.tuples()}


async def outbox_depth(session: AsyncSession) -> int:
    """How many status reports wait to be sent to a hub."""
    return int((await session.execute(
        select(func.count()).select_from(models.OutboxEntry))).scalar_one())


def _enqueue_report(tx: Statements, agent: models.Agent) -> wire_pb2.Agent:
    """Queue the agent's new state (its report_seq already counted up) for the hub that
    spawned it, in the change's transaction: a change is never committed without its
    report, nor the reverse. Returns the state queued."""
    state = to_wire(agent)
    tx.run(_ADD_REPORT, {"hub": agent.peer, "agent_id": agent.agent_id,
                         "seq": agent.report_seq, "payload": state.SerializeToString(),
                         "created_at_ms": now_ms()})
    return state


@dataclass(frozen=True)
class Quotas:
    """How many live agents a spawn may join (None: no quota at that level)."""

    workspace: int | None = None
    template: int | None = None  # in the workspace
    spoke: int | None = None  # across tenants
    # Of one tenant on this spoke; None with a spoke quota: an equal share of it among
    # the spoke's tenants.
    tenant: int | None = None


# Built once: asked on every command about an agent, and on every change of one.
_AGENT_KEYS, _AGENT_COLUMNS = mapped_columns(models.Agent)
_BY_ID = select(*_AGENT_COLUMNS).where(models.Agent.agent_id == bindparam("b_agent"))
# Spelled out, not IN (...): a statement built once takes no IN list (direct.py).
_LIVE = or_(*(models.Agent.state == state for state in sorted(LIVE_STATES)))
_LIVE_BY_ID = _BY_ID.where(_LIVE)
_ADD_AGENT = insert(models.Agent)
# The columns set are the parameters given besides b_agent.
_CHANGE_AGENT = update(models.Agent).where(models.Agent.agent_id == bindparam("b_agent"))
_ADD_REPORT = insert(models.OutboxEntry)


class ScopedAgents:
    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    def _visible(self) -> Select[models.Agent]:
        scope = current_scope()
        query = select(models.Agent).where(models.Agent.tenant == scope.tenant)
        if scope.workspace is not None:
            query = query.where(models.Agent.workspace == scope.workspace)
        if scope.allowed_workspaces is not None:
            query = query.where(models.Agent.workspace.in_(sorted(scope.allowed_workspaces)))
        return query

    async def get(self, agent_id: str) -> models.Agent | None:
        """The agent, if the active scope sees it."""
        agent = await self.find_anywhere(agent_id)
        if agent is None or not current_scope().sees(agent.tenant, agent.workspace):
            return None
        return agent

    async def visible(self) -> list[models.Agent]:
        async with self._trail.reader() as session:
            return list((await session.execute(
                self._visible().order_by(models.Agent.created_at_ms))).scalars())

    async def find_anywhere(self, agent_id: str) -> models.Agent | None:
        """An agent by id in any scope: only to refuse a reused id, or to know a spawn
        seen before; never to answer what exists. A detached copy, for reading."""
        row = await self._trail.direct.first(_BY_ID, {"b_agent": agent_id})
        return None if row is None else to_model(models.Agent, _AGENT_KEYS, row)

    async def create(self, agent: models.Agent, entry: AuditEntry, quotas: Quotas) -> None:
        """Insert a PENDING agent unless the spoke, its workspace or its template is at
        its quota."""
        if not current_scope().sees(agent.tenant, agent.workspace):
            raise RuntimeError("refusing to create an agent outside the active scope")
        agent.report_seq = 1
        row = {key: getattr(agent, key) for key in _AGENT_KEYS}

        def create(tx: Statements) -> None:
            _check_quota(tx, agent, quotas)
            tx.run(_ADD_AGENT, row)
            _enqueue_report(tx, agent)
            add_audit(tx, entry)

        await self._trail.apply(create)
        self._trail.changed()


# Live agents on the spoke, in a workspace, and of a template in a workspace; built once.
_COUNT_LIVE = select(func.count()).select_from(models.Agent).where(_LIVE)
_COUNT_IN_WS = _COUNT_LIVE.where(models.Agent.tenant == bindparam("b_tenant"),
                                 models.Agent.workspace == bindparam("b_ws"))
_COUNT_OF_TEMPLATE = _COUNT_IN_WS.where(models.Agent.template == bindparam("b_template"))
_COUNT_OF_TENANT = _COUNT_LIVE.where(models.Agent.tenant == bindparam("b_tenant"))
_COUNT_TENANTS = select(func.count()).select_from(models.Tenant)


def tenant_quota(tx: Statements, quotas: Quotas) -> int | None:
    """The most live agents one tenant may have here (None: no limit)."""
    if quotas.tenant is not None or quotas.spoke is None:
        return quotas.tenant
    found = tx.first(_COUNT_TENANTS, {})
    tenants = max(int(found[0]) if found else 1, 1)
    return -(-quotas.spoke // tenants)


def _check_quota(tx: Statements, agent: models.Agent, quotas: Quotas) -> None:
    checks = [(quotas.spoke, _COUNT_LIVE, "this spoke"),
              (tenant_quota(tx, quotas), _COUNT_OF_TENANT, f"tenant '{agent.tenant}'"),
              (quotas.workspace, _COUNT_IN_WS, f"workspace '{agent.workspace}'"),
              (quotas.template, _COUNT_OF_TEMPLATE,
               f"template '{agent.template}' in workspace '{agent.workspace}'")]
    for limit, count, what in checks:
        if limit is None:
            continue
        found = tx.first(count, {"b_tenant": agent.tenant, "b_ws": agent.workspace,
                                 "b_template": agent.template})
        running = found[0] if found else 0
        if running >= limit:
            # The spoke-wide count spans tenants: say it is full, never how full.
            detail = (f"is at its capacity ({limit} agents)" if what == "this spoke"
                      else f"already runs {running} of at most {limit} agents"
                      + (" on this spoke" if what.startswith("tenant") else ""))
            raise ResourceExhausted(f"{what} {detail}; retry when one ends, or use "
                                    "another spoke", retry_after_ms=QUOTA_RETRY_AFTER_MS)


class AgentLedger:
    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    async def started(self, agent_id: str, pid: int, start_time: int,
                      note: str = "running") -> wire_pb2.Agent | None:
        """Record that the agent runs; its new state (None if it was final already)."""
        return await self._move(agent_id, "agent.start", state="RUNNING", pid=pid,
                                pid_start_time=start_time, started_at_ms=now_ms(),
                                reason=note)

    async def ended(self, agent_id: str, state: str, exit_code: int | None, reason: str,
                    *, by: str = "", message_id: str = "") -> wire_pb2.Agent | None:
        """Record a final state; an agent already final keeps its first ending (and
        None is returned)."""
        return await self._move(agent_id, _END_ACTIONS[state], by=by, message_id=message_id,
                                state=state, exit_code=exit_code, reason=reason,
                                ended_at_ms=now_ms())

    async def live(self) -> list[models.Agent]:
        async with self._trail.reader() as session:
            return list((await session.execute(
                select(models.Agent).where(models.Agent.state.in_(sorted(LIVE_STATES)))
            )).scalars())

    async def _move(self, agent_id: str, action: str, *, by: str = "", message_id: str = "",
                    **values: object) -> wire_pb2.Agent | None:
        """Change a live agent and audit it in one transaction, returning its new state;
        final agents stay as they are (None)."""
        def move(tx: Statements) -> wire_pb2.Agent | None:
            row = tx.first(_LIVE_BY_ID, {"b_agent": agent_id})
            if row is None:
                return None
            now = {**dict(zip(_AGENT_KEYS, row, strict=True)), **values}
            now["report_seq"] = (now["report_seq"] or 0) + 1
            tx.run(_CHANGE_AGENT, {"b_agent": agent_id, "report_seq": now["report_seq"],
                                   **values})
            agent = to_model(models.Agent, _AGENT_KEYS, [now[key] for key in _AGENT_KEYS])
            state = _enqueue_report(tx, agent)
            add_audit(tx, AuditEntry(
                action=action, outcome=ALLOWED, tenant=agent.tenant,
                workspace=agent.workspace, principal=by, peer=agent.peer if by else "",
                target=agent_id, message_id=message_id,
                reason=f"{values['state']}: {values['reason']}"))
            return state

        state = await self._trail.apply(move)
        if state is not None:
            self._trail.changed()
        return state
