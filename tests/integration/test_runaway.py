"""Stopping runaway agents: bulk kill, kill reasons, spoke capacity, emergency drain."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator

import pytest

from hub.client import HubClient
from shared.errors import PermissionDenied, ResourceExhausted
from shared.pb.v1 import operator_pb2
from tests.conftest import Federation, build_federation
from tests.integration.helpers import eventually, pid_alive, processes_with_marker, read_pid, state

GRACE_MS = 1000


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    for f in build_federation(tmp_path_factory.mktemp("runaway")):
        f.add_spoke("spoke-ops", tenants={"acme": ["bulk", "misc"]},
                    grants=[("acme", None, "admin")])
        yield f


def admin(fed: Federation) -> HubClient:
    return HubClient(fed.hub.address, fed.tokens["acme-admin"])


async def test_bulk_kill_of_fifty_leaves_no_survivor_within_grace_and_a_bound(
        fed: Federation) -> None:
    async with admin(fed) as hub:
        spawns = [hub.spawn(spoke="spoke-ops", workspace="bulk",
                            template="stubborn" if i % 3 == 0 else "sleeper",
                            task=f"bulk {i}", params={}) for i in range(50)]
        agents = await asyncio.gather(*spawns)
        stubborn = [a for a in agents if a.template == "stubborn"]
        files = [(a.agent_id, fed.agent_workdir("spoke-ops", "acme", "bulk", a.agent_id)
                  / "grandchild.pid") for a in stubborn]
        await eventually(lambda: all(read_pid(a, f) for a, f in files),
                         timeout=60, what="every stubborn agent's escaped grandchild")
        grandchildren = [read_pid(a, f) for a, f in files]

        req = operator_pb2.KillAgentsRequest(workspace="bulk", reason="runaway batch",
                                             grace_ms=GRACE_MS)
        started = time.monotonic()
        resp = await hub.kill_many(req)
        elapsed = time.monotonic() - started

    assert len(resp.results) == 50 and not any(r.error for r in resp.results)
    assert {state(r.agent) for r in resp.results} == {"KILLED"}
    assert all("runaway batch" in r.agent.reason for r in resp.results)
    assert {"SIGKILL" in r.agent.reason for r in resp.results
            if r.agent.template == "stubborn"} == {True}
    for a in agents:
        assert processes_with_marker(a.agent_id) == [], a.agent_id
    assert not any(pid_alive(p) for p in grandchildren if p)
    # Concurrent, not one by one: 17 stubborn agents one after another would take 17 s.
    assert elapsed < GRACE_MS / 1000 + 8, f"bulk kill took {elapsed:.1f} s"


async def test_bulk_kill_filters_dry_run_and_role(fed: Federation) -> None:
    async with admin(fed) as hub, HubClient(fed.hub.address, fed.tokens["acme"]) as alice:
        a = await hub.spawn(spoke="spoke-ops", workspace="misc", template="sleeper",
                            task="", params={})
        b = await hub.spawn(spoke="spoke-ops", workspace="misc", template="exit-with",
                            task="", params={"code": "0"})
        await eventually(lambda: _done(hub, b.agent_id), what="b to end")

        dry = await hub.kill_many(operator_pb2.KillAgentsRequest(workspace="misc",
                                                                 dry_run=True))
        assert [r.agent.agent_id for r in dry.results] == [a.agent_id]
        assert processes_with_marker(a.agent_id), "a dry run kills nothing"
        none_old = await hub.kill_many(operator_pb2.KillAgentsRequest(
            workspace="misc", older_than_ms=3_600_000, dry_run=True))
        assert list(none_old.results) == []
        other = await hub.kill_many(operator_pb2.KillAgentsRequest(
            workspace="misc", template="stubborn", dry_run=True))
        assert list(other.results) == []
        with pytest.raises(PermissionDenied):
            await alice.kill_many(operator_pb2.KillAgentsRequest(workspace="misc"))

        killed = await hub.kill_many(operator_pb2.KillAgentsRequest(
            workspace="misc", template="sleeper", grace_ms=GRACE_MS))
        assert [state(r.agent) for r in killed.results] == ["KILLED"]


async def _done(hub: HubClient, agent_id: str) -> bool:
    return state(await hub.status(agent_id)) == "SUCCEEDED"


def test_bulk_kill_through_the_cli_and_kill_reason_in_the_audit(fed: Federation) -> None:
    env = fed.agent_env("acme-admin")
    spawned = json.loads(fed.fed.cli("agent", "spawn", "--spoke", "spoke-ops", "--workspace",
                                     "misc", "--template", "sleeper", "--json", env=env,
                                     show=False).stdout)
    dry = fed.fed.cli("agent", "kill", "--workspace", "misc", "--all", "--dry-run", "--json",
                      env=env, show=False)
    assert [r["agent_id"] for r in json.loads(dry.stdout)] == [spawned["agent_id"]]
    done = fed.fed.cli("agent", "kill", "--workspace", "misc", "--all", "--reason",
                       "oncall cleanup", "--grace", "1", "--json", env=env, show=False)
    rows = json.loads(done.stdout)
    assert [(r["state"], r["error"]) for r in rows] == [("KILLED", None)]
    bad = fed.fed.cli("agent", "kill", "--all", env=env, check=False, show=False)
    assert bad.returncode == 2 and "--workspace" in bad.stderr
    with sqlite3.connect(fed.home("spoke-ops") / "state.db") as conn:
        reason = conn.execute("SELECT reason FROM audit_log WHERE target = ? AND action = "
                              "'agent.kill'", (spawned["agent_id"],)).fetchone()[0]
    assert "oncall cleanup" in reason and "ada" in reason


async def test_spoke_capacity_and_emergency_drain(fed: Federation) -> None:
    # Built like every other test spoke, then given a capacity of 3 before it starts.
    await asyncio.to_thread(fed.add_spoke, "spoke-cap", tenants={"acme": ["w"]},
                            grants=[("acme", None, "admin")], start=False)
    cfg = fed.home("spoke-cap") / "config.toml"
    cfg.write_text(cfg.read_text().replace("max_agents = 0", "max_agents = 3"))
    daemon = await asyncio.to_thread(fed.fed.start, "spoke", "spoke-cap")
    await asyncio.to_thread(fed.fed.trust, fed.hub.name, "spoke-cap", daemon.address)
    async with admin(fed) as hub:
        agents = [await hub.spawn(spoke="spoke-cap", workspace="w",
                                  template="stubborn" if i == 0 else "sleeper",
                                  task="", params={}) for i in range(3)]
        with pytest.raises(ResourceExhausted) as err:
            await hub.spawn(spoke="spoke-cap", workspace="w", template="sleeper", task="",
                            params={})
        assert "at its capacity" in err.value.message and "runs" not in err.value.message

        drained = await asyncio.to_thread(fed.fed.cli, "spoke", "drain", "--home",
                                          str(fed.home("spoke-cap")), "--reason", "incident")
        assert "drained" in drained.stdout
        for a in agents:
            assert processes_with_marker(a.agent_id) == []
            live = await hub.status(a.agent_id, live=True)
            assert state(live) == "KILLED" and "spoke drained: incident" in live.reason
        with pytest.raises(ResourceExhausted) as err:
            await hub.spawn(spoke="spoke-cap", workspace="w", template="sleeper", task="",
                            params={})
        assert "draining" in err.value.message
        await asyncio.to_thread(fed.fed.cli, "spoke", "resume", "--home",
                                str(fed.home("spoke-cap")))
        again = await hub.spawn(spoke="spoke-cap", workspace="w", template="sleeper",
                                task="", params={})
        assert state(again) == "RUNNING"
        await hub.kill(again.agent_id, grace_ms=GRACE_MS)


async def test_one_tenant_cannot_take_every_place_of_a_shared_spoke(fed: Federation) -> None:
    """With max_agents = 4 and two tenants, each may run 2 (an equal share)."""
    await asyncio.to_thread(fed.add_spoke, "spoke-fair",
                            tenants={"acme": ["w"], "globex": ["ops"]}, start=False)
    cfg = fed.home("spoke-fair") / "config.toml"
    cfg.write_text(cfg.read_text().replace("max_agents = 0", "max_agents = 4"))
    daemon = await asyncio.to_thread(fed.fed.start, "spoke", "spoke-fair")
    await asyncio.to_thread(fed.fed.trust, fed.hub.name, "spoke-fair", daemon.address)
    started = []
    async with admin(fed) as acme, HubClient(fed.hub.address, fed.tokens["globex"]) as globex:
        for _ in range(2):
            started.append(await acme.spawn(spoke="spoke-fair", workspace="w",
                                            template="sleeper", task="", params={}))
        with pytest.raises(ResourceExhausted) as err:
            await acme.spawn(spoke="spoke-fair", workspace="w", template="sleeper", task="",
                             params={})
        assert err.value.message == ("tenant 'acme' already runs 2 of at most 2 agents on "
                                     "this spoke; retry when one ends, or use another spoke")
        assert err.value.retry_after_ms > 0
        # The other tenant's places were kept for it.
        for _ in range(2):
            ran = await globex.spawn(spoke="spoke-fair", workspace="ops", template="sleeper",
                                     task="", params={})
            assert state(ran) == "RUNNING"
        with pytest.raises(ResourceExhausted, match="this spoke is at its capacity"):
            await globex.spawn(spoke="spoke-fair", workspace="ops", template="sleeper",
                               task="", params={})
        for agent in started:
            await acme.kill(agent.agent_id, grace_ms=GRACE_MS)
        killed = await globex.kill_many(operator_pb2.KillAgentsRequest(
            workspace="ops", spoke="spoke-fair", grace_ms=GRACE_MS))
        assert {state(r.agent) for r in killed.results} == {"KILLED"}
