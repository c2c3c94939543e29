"""What the hub does for an operator: check the token's scope, then ask the spoke.

The hub authorizes first (tenant from the token, role, its registry scoped by tenant);
the spoke checks everything again on its own before it acts.
"""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime

from sqlalchemy import bindparam, select

from hub.dispatch import SpokeDispatcher
from hub.liveness import OFFLINE, spoke_status
from hub.registry import HubRegistry, known_agent
from shared.audit import ALLOWED, AuditEntry, AuditTrail, append_audit
from shared.config import SLUG_RE, Config, check_name
from shared.db import models
from shared.db.direct import mapped_columns, to_model
from shared.envelope import now_ms
from shared.errors import (
    FleetwireError,
    InvalidArgument,
    NotFound,
    Unavailable,
    not_found_agent,
)
from shared.pb.v1 import operator_pb2, wire_pb2
from shared.peers import ACTIVE
from shared.scope import Action, current_scope, require_role


def _state(agent: wire_pb2.Agent) -> str:
    return wire_pb2.AgentState.Name(agent.state).removeprefix("AGENT_STATE_")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds") if ms else "never"


def _done(action: str, agent: wire_pb2.Agent, spoke: str, message_id: str,
          reason: str) -> AuditEntry:
    """The audit record of a change the operator asked for and a spoke carried out."""
    scope = current_scope()
    return AuditEntry(action=action, outcome=ALLOWED, tenant=scope.tenant,
                      workspace=agent.workspace, principal=scope.principal.name, peer=spoke,
                      target=agent.agent_id, message_id=message_id, reason=reason)


def _not_found_spoke(spoke: str) -> NotFound:
    return NotFound(f"spoke '{spoke}' not found or not active; see `fleetwire spoke list` "
                    "(a spoke is known once it joined, and reachable once it has an address)")


# A spoke peer (active, with an address) by name; built once.
_PEER_KEYS, _PEER_COLUMNS = mapped_columns(models.Peer)
_ONE_SPOKE = select(*_PEER_COLUMNS).where(models.Peer.name == bindparam("b_name"),
                                          models.Peer.state == ACTIVE,
                                          models.Peer.address != "")


class HubOperator:
    def __init__(self, cfg: Config, trail: AuditTrail, dispatcher: SpokeDispatcher,
                 registry: HubRegistry) -> None:
        self._cfg = cfg
        self._trail = trail
        self._dispatch = dispatcher
        self.registry = registry

    def _command(self, workspace: str) -> wire_pb2.Command:
        scope = current_scope()
        return wire_pb2.Command(tenant=scope.tenant, workspace=workspace,
                                principal=scope.principal.to_wire())

    async def _spokes(self) -> dict[str, models.Peer]:
        """Spoke peers (active, with an address) by name."""
        async with self._trail.reader() as session:
            rows = (await session.execute(
                select(models.Peer).where(models.Peer.state == ACTIVE,
                                          models.Peer.address != "")
                .order_by(models.Peer.name))).scalars()
            return {p.name: p for p in rows}

    def _status(self, peer: models.Peer) -> str:
        return spoke_status(peer, now_ms(), self._cfg.hub.offline_after_seconds)

    async def _address(self, spoke: str) -> str:
        """The address of a spoke that may be asked now; fail fast if it is OFFLINE."""
        row = await self._trail.direct.first(_ONE_SPOKE, {"b_name": spoke})
        return self._reachable(spoke, None if row is None
                               else to_model(models.Peer, _PEER_KEYS, row))

    def _reachable(self, spoke: str, peer: models.Peer | None) -> str:
        """The address of spoke (its record: peer) if it may be asked now."""
        if peer is None:
            raise _not_found_spoke(spoke)
        if self._status(peer) == OFFLINE:
            raise Unavailable(
                f"spoke '{spoke}' is OFFLINE: no heartbeat since "
                f"{_iso(peer.last_heartbeat_ms or 0)}; try again when `fleetwire spoke list` "
                "shows it ONLINE")
        return peer.address

    async def spawn(self, req: operator_pb2.SpawnAgentRequest,
                    agent_id: str = "") -> wire_pb2.Agent:
        """Spawn on the spoke the request names; agent_id (when a retry must name the
        same agent) or a new one."""
        require_role(current_scope().principal, Action.SPAWN)
        if not req.spoke:
            raise InvalidArgument("name the spoke to spawn on (--spoke)")
        if not SLUG_RE.match(req.workspace):
            raise InvalidArgument(f"workspace '{req.workspace}' is not a valid slug")
        check_name("template", req.template)
        address = await self._address(req.spoke)
        agent_id = agent_id or secrets.token_hex(16)
        command = self._command(req.workspace)
        command.spawn.CopyFrom(wire_pb2.SpawnAgent(
            agent_id=agent_id, template=req.template, task=req.task, params=req.params))
        message_id, signed = self._dispatch.seal(req.spoke, command)
        await self.registry.record_pending(agent_id=agent_id, spoke=req.spoke,
                                           workspace=req.workspace, template=req.template,
                                           message_id=message_id)
        try:
            response = await self._dispatch.deliver(req.spoke, address, message_id, signed)
        except FleetwireError:
            await self.registry.forget(agent_id)
            raise
        return await self._seen(req.spoke, response.agent, _done(
            "agent.spawn", response.agent, req.spoke, message_id,
            f"template {req.template}: {_state(response.agent)}"))

    async def status(self, agent_id: str, live: bool = False) -> wire_pb2.Agent:
        require_role(current_scope().principal, Action.STATUS)
        known, peer = await self._known(agent_id)
        if not live:
            return self._marked(known_agent(known), {known.spoke: peer} if peer else {})
        command = self._command(known.workspace)
        command.get.agent_id = agent_id
        response = await self._dispatch.send(known.spoke, self._reachable(known.spoke, peer),
                                             command)
        answer = response.agent
        if (answer.agent_id == known.agent_id and known.snapshot is not None
                and answer.seq <= known.report_seq and answer.tenant == known.tenant):
            # Nothing newer than the registry holds (most live answers): only the time
            # it was heard from changes, and that is written in the background.
            self.registry.heard(known.spoke, answer)
            answer.spoke = known.spoke
            return answer
        return await self._seen(known.spoke, answer)

    async def kill(self, agent_id: str, grace_ms: int | None,
                   reason: str = "") -> wire_pb2.Agent:
        # Operators may kill only what they spawned; the spoke decides that, since only
        # it knows the agent's principal for sure.
        require_role(current_scope().principal, Action.KILL)
        known, peer = await self._known(agent_id)
        command = self._command(known.workspace)
        command.kill.agent_id = agent_id
        command.kill.reason = reason
        if grace_ms is not None:
            command.kill.grace_ms = grace_ms
        extra = (grace_ms or 0) / 1000 + 10.0
        message_id, signed = self._dispatch.seal(known.spoke, command, extra_timeout=extra)
        response = await self._dispatch.deliver(
            known.spoke, self._reachable(known.spoke, peer), message_id, signed,
            extra_timeout=extra)
        return await self._seen(known.spoke, response.agent, _done(
            "agent.kill", response.agent, known.spoke, message_id,
            f"{_state(response.agent)}: {response.agent.reason}"))

    async def kill_many(self, req: operator_pb2.KillAgentsRequest
                        ) -> operator_pb2.KillAgentsResponse:
        """Kill every matching agent of the tenant in one workspace, concurrently."""
        require_role(current_scope().principal, Action.KILL_MANY)
        if not SLUG_RE.match(req.workspace):
            raise InvalidArgument("name the workspace to kill in (--workspace)")
        if req.older_than_ms < 0:
            raise InvalidArgument("--older-than must not be negative")
        states = {wire_pb2.AgentState.Name(s).removeprefix("AGENT_STATE_")
                  for s in req.states} or {"PENDING", "RUNNING"}
        cutoff = now_ms() - req.older_than_ms
        spokes = await self._spokes()
        targets = []
        for row in await self.registry.visible(spoke=req.spoke, workspace=req.workspace):
            agent = known_agent(row)
            began = agent.started_at_ms or agent.created_at_ms or row.updated_at_ms
            if (row.state in states and (not req.template or row.template == req.template)
                    and (not req.older_than_ms or began <= cutoff)):
                targets.append(self._marked(agent, spokes))
        if req.dry_run:
            return operator_pb2.KillAgentsResponse(results=[
                operator_pb2.KillResult(agent=a) for a in targets])
        grace = req.grace_ms if req.HasField("grace_ms") else None
        outcomes = await asyncio.gather(
            *(self.kill(a.agent_id, grace, req.reason) for a in targets),
            return_exceptions=True)
        results = []
        for target, outcome in zip(targets, outcomes, strict=True):
            if isinstance(outcome, FleetwireError):
                results.append(operator_pb2.KillResult(agent=target, error=outcome.message))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                results.append(operator_pb2.KillResult(agent=outcome))
        return operator_pb2.KillAgentsResponse(results=results)

    async def list_agents(
        self, req: operator_pb2.ListAgentsRequest
    ) -> operator_pb2.ListAgentsResponse:
        require_role(current_scope().principal, Action.LIST)
        if req.workspace and not SLUG_RE.match(req.workspace):
            raise InvalidArgument(f"workspace '{req.workspace}' is not a valid slug")
        spokes = await self._spokes()
        if req.spoke and req.spoke not in spokes:
            raise _not_found_spoke(req.spoke)
        if not req.live:
            rows = await self.registry.visible(spoke=req.spoke, workspace=req.workspace)
            out = operator_pb2.ListAgentsResponse(agents=[
                self._marked(known_agent(r), spokes) for r in rows])
            out.unreachable_spokes.extend(sorted(
                name for name, peer in spokes.items()
                if self._status(peer) == OFFLINE and (not req.spoke or name == req.spoke)))
            out.agents.sort(key=lambda a: (a.created_at_ms, a.agent_id))
            return out
        names = [req.spoke] if req.spoke else list(spokes)

        async def ask(spoke: str) -> list[wire_pb2.Agent]:
            address = await self._address(spoke)
            command = self._command(req.workspace)
            command.list.SetInParent()
            try:
                response = await self._dispatch.send(spoke, address, command)
            except NotFound:
                return []  # no grant or no such workspace there: nothing to show
            return [await self._seen(spoke, a) for a in response.agents.agents]

        results = await asyncio.gather(*(ask(s) for s in names), return_exceptions=True)
        out = operator_pb2.ListAgentsResponse()
        for spoke, result in zip(names, results, strict=True):
            if isinstance(result, Unavailable):
                if req.spoke:
                    raise result
                out.unreachable_spokes.append(spoke)
            elif isinstance(result, BaseException):
                raise result
            else:
                out.agents.extend(result)
        out.agents.sort(key=lambda a: (a.created_at_ms, a.agent_id))
        return out

    def _marked(self, agent: wire_pb2.Agent, spokes: dict[str, models.Peer]
                ) -> wire_pb2.Agent:
        """An agent from the registry; if its spoke is OFFLINE, its state is UNKNOWN and
        the last known one goes into the reason."""
        peer = spokes.get(agent.spoke)
        if peer is not None and self._status(peer) == OFFLINE:
            last = _state(agent)
            agent.stale = True
            agent.state = wire_pb2.AGENT_STATE_UNKNOWN
            agent.reason = (f"spoke OFFLINE; last known {last} at "
                            f"{_iso(agent.reported_at_ms)}: {agent.reason}")
        return agent

    async def logs(self, agent_id: str, tail_lines: int) -> wire_pb2.AgentLogs:
        require_role(current_scope().principal, Action.STATUS)
        known, peer = await self._known(agent_id)
        command = self._command(known.workspace)
        command.logs.CopyFrom(wire_pb2.GetLogs(agent_id=agent_id, tail_lines=tail_lines))
        response = await self._dispatch.send(known.spoke, self._reachable(known.spoke, peer),
                                             command)
        return response.logs

    async def list_spokes(self) -> operator_pb2.ListSpokesResponse:
        require_role(current_scope().principal, Action.LIST)
        counts: dict[str, dict[str, int]] = {}
        for row in await self.registry.visible():
            by_state = counts.setdefault(row.spoke, {})
            by_state[row.state] = by_state.get(row.state, 0) + 1
        return operator_pb2.ListSpokesResponse(spokes=[
            operator_pb2.SpokeInfo(name=name, address=peer.address, status=self._status(peer),
                                   last_heartbeat_ms=peer.last_heartbeat_ms or 0,
                                   agents_by_state=counts.get(name, {}),
                                   isolation=peer.isolation)
            for name, peer in (await self._spokes()).items()])

    async def spoke_statuses(self) -> dict[str, int]:
        """How many spokes are ONLINE, OFFLINE and UNKNOWN (all tenants; for metrics)."""
        counts: dict[str, int] = {}
        for peer in (await self._spokes()).values():
            status = self._status(peer)
            counts[status] = counts.get(status, 0) + 1
        return counts

    async def create_workspace(self, req: operator_pb2.CreateWorkspaceRequest
                               ) -> wire_pb2.Workspace:
        """Ask a spoke to make a workspace in the caller's tenant (admins only)."""
        require_role(current_scope().principal, Action.MANAGE)
        if not SLUG_RE.match(req.workspace):
            raise InvalidArgument(f"workspace '{req.workspace}' is not a valid slug")
        command = self._command(req.workspace)
        command.create_workspace.max_agents = req.max_agents
        message_id, signed = self._dispatch.seal(req.spoke, command)
        response = await self._dispatch.deliver(req.spoke, await self._address(req.spoke),
                                                message_id, signed)
        made = response.workspace
        scope = current_scope()
        if made.tenant != scope.tenant or made.workspace != req.workspace:
            raise InvalidArgument(f"spoke '{req.spoke}' answered with another workspace")
        async with self._trail.transaction() as session:
            await append_audit(session, AuditEntry(
                action="workspace.create", outcome=ALLOWED, tenant=scope.tenant,
                workspace=req.workspace, principal=scope.principal.name, peer=req.spoke,
                target=req.workspace, message_id=message_id))
        made.spoke = req.spoke
        return made

    async def _known(self, agent_id: str) -> tuple[models.HubAgent, models.Peer | None]:
        """An agent of the caller's tenant, and its spoke's record if that spoke is
        active with an address."""
        found = await self.registry.find_with_spoke(agent_id)
        if found is None:
            raise not_found_agent(agent_id)
        return found

    async def _seen(self, spoke: str, agent: wire_pb2.Agent,
                    audit: AuditEntry | None = None) -> wire_pb2.Agent:
        """Check a spoke's answer is in the caller's tenant, record it (with the audit
        record of the change, if any), name its spoke."""
        if agent.tenant != current_scope().tenant:
            # A spoke answering with another tenant's agent is broken or hostile.
            raise not_found_agent(agent.agent_id)
        await self.registry.observe(spoke, agent, audit)
        agent.spoke = spoke
        return agent
