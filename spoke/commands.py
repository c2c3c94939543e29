"""What a spoke does with a verified command: scope checks first, then the action.

The checks run in docs/design.md's order and fail closed: the sending hub's grant for the
tenant (and workspace), the workspace's existence, the role (never above what the grant
lets the hub assert), then, for an existing agent, the agent's own scope. What the hub
may not see answers NOT_FOUND exactly like what does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.audit import ALLOWED, REFUSED, AuditEntry, AuditTrail, append_audit
from shared.config import LIMITS, SLUG_RE, Config, effective_limit
from shared.db import models
from shared.db.models import ALL_WORKSPACES
from shared.envelope import now_ms
from shared.errors import (
    FleetwireError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
    not_found_agent,
    not_found_tenant,
    not_found_workspace,
    to_wire_error,
)
from shared.metrics import Metrics
from shared.pb.v1 import wire_pb2
from shared.scope import (
    Action,
    Principal,
    Role,
    Scope,
    current_scope,
    require_role,
    use_scope,
)
from shared.security_view import SecurityView
from shared.tenancy import FoundWorkspace, create_workspace, find_workspace
from spoke import procfs
from spoke.drain import WATCH_SECONDS as DRAIN_WATCH_SECONDS
from spoke.drain import drain_reason
from spoke.grants import TenantGrant, tenant_grant
from spoke.isolation import Isolation, UidPool, exposed_paths
from spoke.launcher import Launcher, LaunchFailed
from spoke.limits import CgroupPlan, CgroupSupport, Limits, needed_controllers
from spoke.logs import read_tail
from spoke.sandbox import FULL, NONE, View
from spoke.shim import (
    EXIT_FILE,
    SUPERVISOR_FILE,
    ShimPlan,
    SpokeSide,
    read_json,
    release_claim,
)
from spoke.store import FINAL_STATES, AgentLedger, Quotas, ScopedAgents, record_of, to_wire
from spoke.supervisor import AgentSupervisor, Ending, Launched, ending_of, forget, sweep
from spoke.templates import MAX_TASK_CHARS, check_text, describe_templates, render_argv

log = logging.getLogger(__name__)

AGENT_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
MAX_REASON_CHARS = 500
DRAIN_RETRY_AFTER_MS = 60_000
_ACTIONS = {"spawn": Action.SPAWN, "get": Action.STATUS, "logs": Action.STATUS,
            "list": Action.LIST, "kill": Action.KILL, "create_workspace": Action.MANAGE}
_ON_AGENT = frozenset({"get", "logs", "kill"})
# Supervisors the launcher keeps ready, each with its init in namespaces, cgroups and
# view already: a spawn takes one instead of making them (ADR 0023).
WARM_SUPERVISORS = 2


@dataclass(frozen=True)
class _Target:
    which: str  # the command's action field
    action: Action
    agent_id: str  # empty for spawn, list and create_workspace
    # The command's workspace as found (None: the command names none, or it does not
    # exist yet: a create_workspace).
    workspace: FoundWorkspace | None


class SpokeCommands:
    def __init__(self, cfg: Config, sessions: async_sessionmaker[AsyncSession],
                 trail: AuditTrail, metrics: Metrics, view: SecurityView,
                 launcher: Launcher, isolation: Isolation) -> None:
        self._cfg = cfg
        self._sessions = sessions
        # Grants and workspaces, read once and kept while the security epoch stands.
        self._view = view
        self._trail = trail
        self._metrics = metrics
        self.agents = ScopedAgents(trail)
        self.ledger = AgentLedger(trail)
        self.isolation = isolation
        self.run_root = launcher.run_dir
        self.supervisor: AgentSupervisor[wire_pb2.Agent | None] = AgentSupervisor(
            launcher, isolation.level != NONE, on_exit=self._record_ending)
        self.cgroups = CgroupSupport(cfg.name, cfg.spoke.use_cgroups)
        self.uids = (UidPool(cfg.spoke.agent_uid_base, cfg.spoke.agent_uid_count)
                     if isolation.level == FULL else None)
        # What every agent of this spoke has alike; the launcher readies supervisors with
        # it (none where no agent may start).
        limits = [Limits(**{n: effective_limit(t, cfg.spoke, n) for n in LIMITS})
                  for t in cfg.templates.values()]
        self.side = SpokeSide(
            level=isolation.level, view=View(home=str(cfg.home), expose=exposed_paths(cfg)),
            cgroup_bases={c: str(base) for c, base in self.cgroups.bases.items()
                          if c in needed_controllers(limits)},
            warm=0 if isolation.refusal else WARM_SUPERVISORS, run_root=str(self.run_root))
        self._running_note = f"isolation {isolation.level}"
        log.info("resource limits on this machine: %s", self.cgroups.describe())

    async def handle(self, peer: str, command: wire_pb2.Command,
                     message_id: str) -> wire_pb2.Response:
        """Answer one command; every refusal becomes a signed Error (and an audit
        record), never an exception."""
        which = command.WhichOneof("action") or "none"
        with self._metrics.command(which) as observed:
            try:
                self._in_time(command)
                scope, target = await self._authorize(peer, command)
                with use_scope(scope):
                    return await self._act(command, target, message_id)
            except FleetwireError as err:
                refusal = err
            except Exception:
                log.exception("command %s from %s failed", which, peer,
                              extra={"peer": peer, "message_id": message_id})
                refusal = Internal("internal error on the spoke; its log has the details")
            observed.refused(refusal)
        await self._trail.record(AuditEntry(
            action=f"agent.{which}", outcome=REFUSED, tenant=command.tenant,
            workspace=command.workspace, principal=command.principal.name, peer=peer,
            target=getattr(command, which).agent_id if which in _ON_AGENT | {"spawn"} else "",
            message_id=message_id, reason=refusal.message))
        return wire_pb2.Response(error=to_wire_error(refusal))

    def _in_time(self, command: wire_pb2.Command) -> None:
        """Refuse a command that arrives after its deadline: its sender has given up on
        it and told its caller it failed, so it must not happen now."""
        late = now_ms() - command.deadline_ms
        if command.deadline_ms and late > 0:
            raise Unavailable(
                f"the command reached spoke '{self._cfg.name}' {late / 1000:.1f} s after its "
                "deadline, when its hub had given up on it; nothing was done (hub and "
                "spoke clocks must agree to within seconds)")

    async def _authorize(self, peer: str, command: wire_pb2.Command) -> tuple[Scope, _Target]:
        which = command.WhichOneof("action")
        if which is None:
            raise InvalidArgument("command names no action")
        action = _ACTIONS[which]
        agent_id = getattr(command, which).agent_id if which in _ON_AGENT else ""

        def hidden() -> NotFound:
            if agent_id:
                return not_found_agent(agent_id)
            if action is Action.MANAGE:
                return not_found_tenant(command.tenant)
            return not_found_workspace(command.workspace or command.tenant)

        workspace = command.workspace or None
        if workspace is None and action is not Action.LIST:
            raise InvalidArgument("command names no workspace")
        if not SLUG_RE.match(command.tenant) or (workspace and not SLUG_RE.match(workspace)):
            raise hidden()
        grant = await self._view.lookup(("grant", peer, command.tenant),
                                        lambda: self._grant(peer, command.tenant))
        # Asked even without a grant, so an ungranted tenant and a missing workspace
        # cost the same work: the answer's timing tells nothing either.
        found = None if workspace is None else await self._view.lookup(
            ("workspace", command.tenant, workspace),
            lambda: self._find_workspace(command.tenant, workspace))
        if grant is None or (workspace is not None and found is None
                             and action is not Action.MANAGE):
            raise hidden()
        if action is Action.MANAGE:
            # Making workspaces is for a hub trusted with the whole tenant.
            limit = grant.roles.get(ALL_WORKSPACES, Role.VIEWER)
        elif workspace is not None:
            granted = grant.max_role_in(workspace)
            if granted is None:
                raise hidden()
            limit = granted
        else:
            limit = max(grant.roles.values())
        asserted = Role.from_wire(command.principal.role)
        # The hub's claim never exceeds what this spoke granted it.
        principal = Principal(name=command.principal.name or "unknown",
                              role=min(asserted, limit))
        note = (f"hub '{peer}' asserts role {asserted.label}, its grant on this spoke allows "
                f"at most {limit.label}") if asserted > limit else ""
        if action is Action.MANAGE and grant.workspaces is not None:
            note = (f"hub '{peer}' holds grants for single workspaces only; making "
                    "workspaces needs a whole-tenant admin grant")
        require_role(principal, action, note=note)
        scope = Scope(tenant=command.tenant, workspace=workspace, principal=principal,
                      allowed_workspaces=grant.workspaces, peer=peer, role_note=note)
        return scope, _Target(which, action, agent_id, found)

    async def _grant(self, peer: str, tenant: str) -> TenantGrant | None:
        async with self._sessions() as session:
            return await tenant_grant(session, peer, tenant)

    async def _find_workspace(self, tenant: str, workspace: str) -> FoundWorkspace | None:
        async with self._sessions() as session:
            return await find_workspace(session, tenant, workspace)

    async def _act(self, command: wire_pb2.Command, target: _Target,
                   message_id: str) -> wire_pb2.Response:
        if target.action is Action.SPAWN:
            assert target.workspace is not None
            return wire_pb2.Response(agent=await self._spawn(command.spawn, message_id,
                                                             target.workspace))
        if target.action is Action.LIST:
            agents = await self.agents.visible()
            return wire_pb2.Response(agents=wire_pb2.AgentList(agents=[to_wire(a) for a in agents]))
        if target.action is Action.MANAGE:
            return wire_pb2.Response(workspace=await self._create_workspace(
                command, message_id))
        agent = await self.agents.get(target.agent_id)
        if agent is None:
            raise not_found_agent(target.agent_id)
        if target.which == "logs":
            text, truncated = read_tail(Path(agent.log_path), command.logs.tail_lines)
            return wire_pb2.Response(logs=wire_pb2.AgentLogs(
                agent_id=agent.agent_id, text=text, truncated=truncated))
        if target.action is Action.STATUS:
            return wire_pb2.Response(agent=to_wire(agent))
        return wire_pb2.Response(agent=await self._kill(agent, command.kill, message_id))

    async def _spawn(self, req: wire_pb2.SpawnAgent, message_id: str,
                     workspace: FoundWorkspace) -> wire_pb2.Agent:
        scope = current_scope()
        draining = drain_reason(self._cfg)
        if draining is not None:
            raise ResourceExhausted(
                f"spoke '{self._cfg.name}' is draining and takes no new agents "
                f"({draining}); use another spoke", retry_after_ms=DRAIN_RETRY_AFTER_MS)
        template = self._cfg.templates.get(req.template)
        if template is None:
            raise InvalidArgument(
                f"unknown template '{req.template}'; this spoke offers: "
                f"{describe_templates(self._cfg.templates)}"
            )
        if not AGENT_ID_RE.match(req.agent_id):
            raise InvalidArgument("agent_id must be 32 lowercase hex digits")
        check_text("task", req.task, MAX_TASK_CHARS)
        existing = await self.agents.find_anywhere(req.agent_id)
        if existing is not None:
            if scope.sees(existing.tenant, existing.workspace) and existing.peer == scope.peer:
                # The same spawn again (its first run was cut off by a restart): one agent.
                return to_wire(existing)
            raise InvalidArgument(f"agent id '{req.agent_id}' is already in use; use a new id")
        self.isolation.check(template.name, template.isolation, self._cfg.name)
        assert scope.workspace is not None
        base = self._cfg.workspaces_root / scope.tenant / scope.workspace
        workdir = base / "agents" / req.agent_id
        log_path = base / "logs" / f"{req.agent_id}.log"
        argv = render_argv(template, dict(req.params), {
            "python": sys.executable, "task": req.task, "agent_id": req.agent_id,
            "tenant": scope.tenant, "workspace": scope.workspace, "workdir": str(workdir),
        })
        env = {k: os.environ[k] for k in self._cfg.spoke.pass_env if k in os.environ}
        env.update(template.env)
        env.update({
            procfs.AGENT_ENV: req.agent_id, "FLEETWIRE_TENANT": scope.tenant,
            "FLEETWIRE_WORKSPACE": scope.workspace, "FLEETWIRE_TASK": req.task,
            "FLEETWIRE_SPOKE": self._cfg.name, "HOME": str(workdir),
            "PYTHONUNBUFFERED": "1",
        })
        claim = self.uids.claim() if self.uids is not None else None
        agent = models.Agent(
            agent_id=req.agent_id, tenant=scope.tenant, workspace=scope.workspace,
            template=template.name, task=req.task, principal=scope.principal.name,
            peer=scope.peer, state="PENDING", reason="starting", workdir=str(workdir),
            log_path=str(log_path), grace_ms=int(template.grace_seconds * 1000),
            created_at_ms=now_ms())
        try:
            await self.agents.create(agent, AuditEntry(
                action="agent.spawn", outcome=ALLOWED, tenant=scope.tenant,
                workspace=scope.workspace, principal=scope.principal.name, peer=scope.peer,
                target=req.agent_id, message_id=message_id,
                reason=f"template {template.name}"), Quotas(
                    workspace=workspace.max_agents, template=template.max_concurrent or None,
                    spoke=self._cfg.spoke.max_agents or None,
                    tenant=self._cfg.spoke.max_agents_per_tenant or None))
        except BaseException:
            if claim is not None:
                release_claim(claim[1])
            raise
        limits = Limits(**{f"{n}": effective_limit(template, self._cfg.spoke, n)
                           for n in LIMITS})
        plan = ShimPlan(
            agent_id=req.agent_id, argv=argv, env=env, workdir=str(workdir),
            network=template.network != "none", log_path=str(log_path),
            log_cap_bytes=limits.log_mb << 20, run_dir=str(self.run_root / req.agent_id),
            max_runtime_seconds=template.max_runtime_seconds,
            grace_seconds=template.grace_seconds,
            uid=claim[0] if claim else -1, gid=claim[0] if claim else -1,
            cgroup_settings=self.cgroups.settings(limits), open_files=limits.open_files,
            cpu_seconds=limits.cpu_seconds, keep_descendants=template.keep_descendants,
            limits={f.name: getattr(limits, f.name) for f in fields(limits)},
            record=record_of(agent))
        try:
            launched = await self.supervisor.launch(plan, limits, claim[1] if claim else None)
        except LaunchFailed as exc:
            now = await self.ledger.ended(req.agent_id, "FAILED", None, str(exc))
            forget(Path(plan.run_dir))
        else:
            enforced = (f"; limits enforced: {self.cgroups.describe()}"
                        if replace(limits, log_mb=0) != Limits() else "")
            now = await self.ledger.started(req.agent_id, launched.pid, launched.start_time,
                                            f"running ({self._running_note}{enforced})")
            self.supervisor.watch(req.agent_id)
        if now is None:
            # Ended meanwhile by someone else (a drain): answer what the record says.
            ended = await self.agents.get(req.agent_id)
            assert ended is not None
            return to_wire(ended)
        return now

    async def _create_workspace(self, command: wire_pb2.Command,
                                message_id: str) -> wire_pb2.Workspace:
        scope = current_scope()
        max_agents = command.create_workspace.max_agents or None
        async with self._trail.transaction() as session:
            await create_workspace(session, scope.tenant, command.workspace, max_agents)
            await append_audit(session, AuditEntry(
                action="workspace.create", outcome=ALLOWED, tenant=scope.tenant,
                workspace=command.workspace, principal=scope.principal.name, peer=scope.peer,
                target=command.workspace, message_id=message_id,
                reason=f"max_agents={max_agents}" if max_agents else ""))
        return wire_pb2.Workspace(tenant=scope.tenant, workspace=command.workspace,
                                  max_agents=max_agents or 0)

    async def _kill(self, agent: models.Agent, req: wire_pb2.KillAgent,
                    message_id: str) -> wire_pb2.Agent:
        scope = current_scope()
        principal = scope.principal
        require_role(principal, Action.KILL, owns_target=agent.principal == principal.name,
                     note=scope.role_note)
        grace_ms = req.grace_ms if req.HasField("grace_ms") else agent.grace_ms
        if grace_ms > self._cfg.spoke.max_grace_seconds * 1000:
            raise InvalidArgument(
                f"grace of {grace_ms / 1000:g} s exceeds this spoke's max_grace_seconds "
                f"({self._cfg.spoke.max_grace_seconds}); ask for less"
            )
        check_text("kill reason", req.reason, MAX_REASON_CHARS)
        if agent.state in FINAL_STATES:
            return to_wire(agent)
        reason = f"killed by {principal.name} via {current_scope().peer}" + (
            f": {req.reason}" if req.reason else "")
        if self.supervisor.is_supervised(agent.agent_id):
            ended = await self.supervisor.kill(agent.agent_id, grace_ms / 1000, reason,
                                               by=principal.name, message_id=message_id)
        else:
            # Live in the record but not supervised: recover() found its supervisor gone.
            found = await asyncio.to_thread(self._sweep, agent)
            ended = await self.ledger.ended(
                agent.agent_id, "LOST", None,
                f"its supervisor was gone when the kill arrived; {found}",
                by=principal.name, message_id=message_id)
        if ended is not None:
            return ended
        # It ended otherwise meanwhile (by itself, or by a drain): the record says how.
        killed = await self.agents.get(agent.agent_id)
        assert killed is not None
        return to_wire(killed)

    async def drain(self, reason: str) -> int:
        """Kill every live agent of this spoke at once; returns how many were live."""
        live = await self.ledger.live()

        async def stop(agent: models.Agent) -> None:
            why = f"spoke drained: {reason}" if reason else "spoke drained"
            if self.supervisor.is_supervised(agent.agent_id):
                await self.supervisor.kill(agent.agent_id, agent.grace_ms / 1000, why,
                                           by="local:drain")
            else:
                found = await asyncio.to_thread(self._sweep, agent)
                await self.ledger.ended(
                    agent.agent_id, "LOST", None,
                    f"its supervisor was gone when the spoke drained; {found}",
                    by="local:drain")

        await asyncio.gather(*(stop(a) for a in live))
        return len(live)

    async def watch_drain(self) -> None:
        """Drain whenever the flag file appears (checked a few times a second)."""
        while True:
            reason = drain_reason(self._cfg)
            if reason is not None and await self.ledger.live():
                log.warning("draining: killing every agent (%s)", reason or "no reason given")
                await self.drain(reason)
            await asyncio.sleep(DRAIN_WATCH_SECONDS)

    async def _record_ending(self, agent_id: str, ending: Ending) -> wire_pb2.Agent | None:
        """Record how a supervised agent ended; its new state (None: it was final)."""
        return await self.ledger.ended(agent_id, ending.state, ending.exit_code,
                                       ending.reason, by=ending.by,
                                       message_id=ending.message_id)

    def _sweep(self, agent: models.Agent) -> str:
        """Kill what is left of an agent without a supervisor; says what was found."""
        record = read_json(self.run_root / agent.agent_id / SUPERVISOR_FILE) or {}
        groups = record.get("cgroups") or {}
        root = (Launched(agent.pid, agent.pid_start_time)
                if agent.pid and agent.pid_start_time and not record else None)
        found = sweep(agent.agent_id, CgroupPlan(dirs=dict(groups.get("dirs", {}))), root)
        forget(self.run_root / agent.agent_id)
        return (f"{found} of its processes were still running and were killed" if found
                else "nothing of it was left running")

    async def recover(self) -> None:
        """At start-up, for each agent the record says is live: collect how it ended
        from its supervisor's record; or watch its supervisor again (its pid and start
        time matched; a pid whose start time differs is never touched); or, where the
        supervisor is gone too, kill what is left and mark it LOST."""
        for agent in await self.ledger.live():
            run_dir = self.run_root / agent.agent_id
            record = read_json(run_dir / SUPERVISOR_FILE)
            if (run_dir / EXIT_FILE).exists():
                ending = ending_of(read_json(run_dir / EXIT_FILE) or {})
                await self._record_ending(agent.agent_id, ending)
                forget(run_dir)
                log.info("agent %s ended while the spoke was down: %s", agent.agent_id,
                         ending.reason)
                continue
            if record is not None and procfs.is_same_process(
                    int(record.get("pid", 0)), int(record.get("start_time") or 0)):
                launched = Launched(int(record["pid"]), int(record["start_time"]))
                if agent.state == "PENDING":
                    await self.ledger.started(agent.agent_id, launched.pid,
                                              launched.start_time,
                                              f"running ({self._running_note})")
                groups = record.get("cgroups") or {}
                self.supervisor.adopt(
                    agent.agent_id, run_dir, launched,
                    Limits(**(record.get("limits") or {})),
                    CgroupPlan(dirs=dict(groups.get("dirs", {}))),
                    isolated=record.get("level") != NONE,
                    grace_seconds=float(record.get("grace_seconds", agent.grace_ms / 1000)))
                log.info("re-adopted agent %s (supervisor pid %d)", agent.agent_id,
                         launched.pid)
                continue
            if record is None and agent.state == "PENDING":
                await self.ledger.ended(agent.agent_id, "FAILED", None,
                                        "the spoke stopped before the agent started")
                continue
            found = await asyncio.to_thread(self._sweep, agent)
            await self.ledger.ended(agent.agent_id, "LOST", None,
                                    f"its supervisor was gone when the spoke restarted; "
                                    f"{found}")
