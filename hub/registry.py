"""The hub's registry of agents it spawned: where each lives, scoped by tenant."""

from __future__ import annotations

from sqlalchemy import select

from shared.audit import AuditEntry, AuditTrail, append_audit
from shared.db import models
from shared.envelope import now_ms
from shared.pb.v1 import wire_pb2
from shared.scope import current_scope


def _state_name(agent: wire_pb2.Agent) -> str:
    return wire_pb2.AgentState.Name(agent.state).removeprefix("AGENT_STATE_")


class HubRegistry:
    """Every read filters by the active scope's tenant; writes carry it."""

    def __init__(self, trail: AuditTrail) -> None:
        self._trail = trail

    async def find(self, agent_id: str) -> models.HubAgent | None:
        scope = current_scope()
        async with self._trail.reader() as session:
            return (await session.execute(
                select(models.HubAgent).where(models.HubAgent.agent_id == agent_id,
                                              models.HubAgent.tenant == scope.tenant)
            )).scalar_one_or_none()

    async def record_pending(self, *, agent_id: str, spoke: str, workspace: str,
                             template: str, message_id: str) -> None:
        scope = current_scope()
        async with self._trail.transaction() as session:
            session.add(models.HubAgent(
                agent_id=agent_id, spoke=spoke, tenant=scope.tenant, workspace=workspace,
                template=template, principal=scope.principal.name, state="PENDING",
                spawn_message_id=message_id, updated_at_ms=now_ms()))

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
        """Remember what a spoke said of an agent of the active tenant; with audit, record
        the change the operator asked for in the same transaction."""
        scope = current_scope()
        if agent.tenant != scope.tenant:
            return
        async with self._trail.transaction() as session:
            row = await session.get(models.HubAgent, agent.agent_id)
            if row is None:
                session.add(models.HubAgent(
                    agent_id=agent.agent_id, spoke=spoke, tenant=agent.tenant,
                    workspace=agent.workspace, template=agent.template,
                    principal=agent.principal, state=_state_name(agent),
                    spawn_message_id="", updated_at_ms=now_ms()))
            elif row.tenant == scope.tenant and row.spoke == spoke:
                row.state = _state_name(agent)
                row.updated_at_ms = now_ms()
            if audit is not None:
                await append_audit(session, audit)
