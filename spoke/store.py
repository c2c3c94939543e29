"""Agent rows on a spoke.

`ScopedAgents` is the only way the request path reads or creates agents: every query
filters by the active scope's tenant and workspaces. `AgentLedger` records lifecycle
changes by agent id for the supervisor, which acts on agents it already owns.
"""

from __future__ import annotations

from sqlalchemy import Select, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.db import models
from shared.envelope import now_ms
from shared.pb.v1 import wire_pb2
from shared.scope import current_scope

FINAL_STATES = frozenset({"SUCCEEDED", "FAILED", "KILLED", "TIMED_OUT", "LOST"})
LIVE_STATES = frozenset({"PENDING", "RUNNING"})


def to_wire(agent: models.Agent) -> wire_pb2.Agent:
    msg = wire_pb2.Agent(
        agent_id=agent.agent_id, tenant=agent.tenant, workspace=agent.workspace,
        template=agent.template, task=agent.task, principal=agent.principal,
        state=f"AGENT_STATE_{agent.state}",
        created_at_ms=agent.created_at_ms, started_at_ms=agent.started_at_ms or 0,
        ended_at_ms=agent.ended_at_ms or 0, reason=agent.reason,
    )
    if agent.exit_code is not None:
        msg.exit_code = agent.exit_code
    return msg


class ScopedAgents:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    def _visible(self) -> Select[models.Agent]:
        scope = current_scope()
        query = select(models.Agent).where(models.Agent.tenant == scope.tenant)
        if scope.workspace is not None:
            query = query.where(models.Agent.workspace == scope.workspace)
        if scope.allowed_workspaces is not None:
            query = query.where(models.Agent.workspace.in_(sorted(scope.allowed_workspaces)))
        return query

    async def get(self, agent_id: str) -> models.Agent | None:
        async with self._sessions() as session:
            return (await session.execute(
                self._visible().where(models.Agent.agent_id == agent_id))).scalar_one_or_none()

    async def visible(self) -> list[models.Agent]:
        async with self._sessions() as session:
            return list((await session.execute(
                self._visible().order_by(models.Agent.created_at_ms))).scalars())

    async def exists_anywhere(self, agent_id: str) -> bool:
        """Only to refuse a reused id; never to answer what exists."""
        async with self._sessions() as session:
            return await session.get(models.Agent, agent_id) is not None

    async def create(self, agent: models.Agent) -> None:
        scope = current_scope()
        if agent.tenant != scope.tenant or not scope.sees_workspace(agent.workspace):
            raise RuntimeError("refusing to create an agent outside the active scope")
        async with self._sessions() as session, session.begin():
            session.add(agent)


class AgentLedger:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def started(self, agent_id: str, pid: int, start_time: int) -> None:
        await self._set(agent_id, LIVE_STATES, state="RUNNING", pid=pid,
                        pid_start_time=start_time, started_at_ms=now_ms(),
                        reason="running")

    async def ended(self, agent_id: str, state: str, exit_code: int | None, reason: str) -> None:
        """Record a final state; an agent already final keeps its first ending."""
        await self._set(agent_id, LIVE_STATES, state=state, exit_code=exit_code,
                        reason=reason, ended_at_ms=now_ms())

    async def live(self) -> list[models.Agent]:
        async with self._sessions() as session:
            return list((await session.execute(
                select(models.Agent).where(models.Agent.state.in_(sorted(LIVE_STATES)))
            )).scalars())

    async def _set(self, agent_id: str, from_states: frozenset[str], **values: object) -> None:
        async with self._sessions() as session, session.begin():
            await session.execute(
                update(models.Agent)
                .where(models.Agent.agent_id == agent_id,
                       models.Agent.state.in_(sorted(from_states)))
                .values(**values))
