"""The isolation matrix, cell by cell, against real daemons: grant level on the spoke x
workspace x caller (tenant, role, ownership) x action. Refused cells change nothing but
the audit trail."""

from __future__ import annotations

import asyncio
import itertools
import secrets
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.client import HubClient
from shared.errors import FleetwireError, not_found_agent, not_found_workspace
from tests.conftest import Federation, build_federation
from tests.integration.helpers import processes_with_marker, state

# Grant levels the hub holds on each matrix spoke, for tenant acme.
GRANTS = {
    "m-admin": [("acme", None, "admin"), ("globex", None, "operator")],
    "m-op": [("acme", None, "operator"), ("globex", None, "operator")],
    "m-ws": [("acme", "research", "operator"), ("globex", None, "operator")],
    "m-none": [("globex", None, "operator")],
}
WORKSPACES = ("research", "lab")
# Callers: token name in the federation -> (tenant, role rank, principal).
CALLERS = {
    "acme-viewer": ("acme", 1, "vera"),
    "acme": ("acme", 2, "alice"),        # operator, owns the targets
    "acme-bob": ("acme", 2, "bob"),      # operator, owns nothing
    "acme-admin": ("acme", 3, "ada"),
    "globex": ("globex", 3, "gina"),     # admin of the other tenant
}
ACTIONS = ("spawn", "status", "list", "kill")
NEED = {"status": 1, "list": 1, "spawn": 2, "kill": 2}


def expected(spoke: str, workspace: str, caller: str, action: str) -> str:
    """The outcome the rules in docs/design.md and the issue call for, derived independently."""
    tenant, role, principal = CALLERS[caller]
    if tenant != "acme":
        # Targets are acme's; acme's workspace names do not exist in globex.
        return "ok" if action == "list" else "NOT_FOUND"
    if role < NEED[action]:
        return "PERMISSION_DENIED"  # the hub refuses before asking anyone
    if action == "list":
        return "ok"
    grants = {ws: r for t, ws, r in GRANTS[spoke] if t == "acme"}
    level = grants.get(workspace) or grants.get(None)
    if level is None:
        return "NOT_FOUND"  # outside the hub's sight on that spoke: like absence
    effective = min(role, {"operator": 2, "admin": 3}[level])
    if action == "kill" and principal != "alice" and effective < 3:
        return "PERMISSION_DENIED"  # visible, but only owners and admins kill
    return "ok"


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    for fed in build_federation(tmp_path_factory.mktemp("matrix")):
        for name, grants in GRANTS.items():
            fed.add_spoke(name, tenants={"acme": list(WORKSPACES), "globex": ["ops"]},
                          grants=grants)
        yield fed


@pytest.fixture(scope="module")
def targets(matrix: Federation) -> dict[tuple[str, str], str]:
    """One running agent of alice's in every (spoke, workspace) the hub can reach."""
    async def spawn_all() -> dict[tuple[str, str], str]:
        out = {}
        async with HubClient(matrix.hub.address, matrix.tokens["acme"]) as alice:
            for spoke, ws in itertools.product(GRANTS, WORKSPACES):
                if expected(spoke, ws, "acme", "spawn") == "ok":
                    agent = await alice.spawn(spoke=spoke, workspace=ws, template="sleeper",
                                              task="target", params={})
                    out[(spoke, ws)] = agent.agent_id
        return out

    return asyncio.run(spawn_all())


def _rows(db: Path, query: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return list(conn.execute(query))


def world(fed: Federation) -> tuple[object, ...]:
    """Everything a request could change, except the audit trails."""
    spokes = tuple(sorted(_rows(fed.home(s) / "state.db",
                                "SELECT agent_id, state, ended_at_ms FROM agents"))
                   for s in GRANTS)
    hub = sorted(_rows(fed.home(fed.hub.name) / "state.db",
                       "SELECT agent_id, spoke, state FROM hub_agents"))
    return spokes, hub


def refusals(fed: Federation) -> int:
    homes = [fed.home(fed.hub.name), *(fed.home(s) for s in GRANTS)]
    return sum(_rows(h / "state.db", "SELECT count(*) FROM audit_log WHERE outcome = "
                                     "'refused'")[0][0] for h in homes)  # type: ignore[misc]


CELLS = list(itertools.product(GRANTS, WORKSPACES, CALLERS, ACTIONS))


@pytest.mark.parametrize(("spoke", "workspace", "caller", "action"), CELLS,
                         ids=["-".join(c) for c in CELLS])
async def test_cell(matrix: Federation, targets: dict[tuple[str, str], str], spoke: str,
                    workspace: str, caller: str, action: str) -> None:
    want = expected(spoke, workspace, caller, action)
    target = targets.get((spoke, workspace)) or secrets.token_hex(16)
    if action == "kill" and want == "ok":
        # Kills consume their target: give this cell its own.
        async with HubClient(matrix.hub.address, matrix.tokens["acme"]) as alice:
            target = (await alice.spawn(spoke=spoke, workspace=workspace,
                                        template="sleeper", task="kill me", params={})).agent_id
    before, refused_before = world(matrix), refusals(matrix)

    async with HubClient(matrix.hub.address, matrix.tokens[caller]) as hub:
        try:
            if action == "spawn":
                result = await hub.spawn(spoke=spoke, workspace=workspace,
                                         template="sleeper", task="matrix", params={})
            elif action == "status":
                result = await hub.status(target)
            elif action == "kill":
                result = await hub.kill(target, grace_ms=2000)
            else:
                result = await hub.list(spoke=spoke, workspace=workspace)
            got = "ok"
        except FleetwireError as err:
            got = type(err).__name__.replace("NotFound", "NOT_FOUND").replace(
                "PermissionDenied", "PERMISSION_DENIED")
            message = err.message

    assert got == want, f"{spoke}/{workspace} {caller} {action}: {got}"
    if want != "ok":
        assert world(matrix) == before, "a refused request changed state"
        assert refusals(matrix) > refused_before, "a refusal left no audit record"
        if want == "NOT_FOUND":
            # Word for word what a thing that does not exist gets: no existence oracle.
            absent = (not_found_workspace(workspace) if action == "spawn"
                      else not_found_agent(target))
            assert message == absent.message
        return
    tenant = CALLERS[caller][0]
    if action == "list":
        assert all(a.tenant == tenant for a in result.agents)
        assert all(a.spoke == spoke and a.workspace == workspace for a in result.agents)
        visible = expected(spoke, workspace, "acme", "status") == "ok"
        ids = {a.agent_id for a in result.agents}
        if tenant == "acme" and visible:
            assert targets[(spoke, workspace)] in ids
        else:
            assert targets.get((spoke, workspace)) not in ids
    elif action == "spawn":
        assert state(result) == "RUNNING" and result.principal == CALLERS[caller][2]
        async with HubClient(matrix.hub.address, matrix.tokens["acme-admin"]) as admin:
            if expected(spoke, workspace, "acme-admin", "kill") == "ok":
                await admin.kill(result.agent_id, grace_ms=2000)
    elif action == "status":
        assert result.agent_id == target and result.tenant == tenant
    else:
        assert state(result) == "KILLED" and processes_with_marker(target) == []


async def test_concurrent_requests_of_two_tenants_each_see_only_their_own(
        matrix: Federation, targets: dict[tuple[str, str], str]) -> None:
    """Interleaved concurrent requests: the hub's per-request scope never leaks."""
    async with HubClient(matrix.hub.address, matrix.tokens["acme"]) as acme, \
            HubClient(matrix.hub.address, matrix.tokens["globex"]) as globex:
        async with HubClient(matrix.hub.address, matrix.tokens["globex"]) as g:
            own = await g.spawn(spoke="m-op", workspace="ops", template="sleeper",
                                task="globex's", params={})

        async def one(i: int) -> tuple[str, set[str]]:
            client, tenant = (acme, "acme") if i % 2 else (globex, "globex")
            listed = await client.list()
            return tenant, {a.tenant for a in listed.agents}

        results = await asyncio.gather(*(one(i) for i in range(60)))
        for tenant, seen in results:
            assert seen == {tenant}
        await globex.kill(own.agent_id, grace_ms=2000)
