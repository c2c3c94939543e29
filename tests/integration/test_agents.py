"""Spawn, status, list and kill through a real hub and real spokes, with real agents."""

from __future__ import annotations

import pytest

from hub.client import HubClient
from shared.errors import InvalidArgument, NotFound, PermissionDenied
from tests.conftest import Federation
from tests.integration.helpers import (
    eventually,
    pid_alive,
    processes_with_marker,
    read_pid,
    state,
)


def client(fed: Federation, token: str = "acme") -> HubClient:
    return HubClient(fed.hub.address, fed.tokens[token])


async def test_spawn_status_list_kill(federation: Federation) -> None:
    async with client(federation) as hub:
        agent = await hub.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                                task="index the wiki", params={})
        assert state(agent) == "RUNNING"
        assert (agent.spoke, agent.tenant, agent.workspace) == ("spoke-a", "acme", "research")
        assert agent.principal == "alice"
        assert processes_with_marker(agent.agent_id), "the agent's process runs"

        status = await hub.status(agent.agent_id)
        assert state(status) == "RUNNING" and status.started_at_ms > 0

        listed = await hub.list()
        assert agent.agent_id in {a.agent_id for a in listed.agents}
        assert not listed.unreachable_spokes
        assert {a.tenant for a in listed.agents} == {"acme"}

        killed = await hub.kill(agent.agent_id, grace_ms=2000)
        assert state(killed) == "KILLED"
        assert "SIGTERM" in killed.reason and "alice" in killed.reason
        assert killed.ended_at_ms >= killed.started_at_ms
        assert processes_with_marker(agent.agent_id) == []
        # Killing again reports the same final state and changes nothing.
        again = await hub.kill(agent.agent_id)
        assert state(again) == "KILLED" and again.ended_at_ms == killed.ended_at_ms


async def test_agent_exits_by_itself_with_its_code(federation: Federation) -> None:
    async with client(federation) as hub:
        ok = await hub.spawn(spoke="spoke-b", workspace="lab", template="exit-with",
                             task="x; rm -rf / $(reboot)", params={"code": "0"})
        bad = await hub.spawn(spoke="spoke-b", workspace="lab", template="exit-with",
                              task="", params={"code": "3"})

        async def ended() -> bool:
            states = [state(await hub.status(a.agent_id)) for a in (ok, bad)]
            return all(s not in ("PENDING", "RUNNING") for s in states)

        await eventually(ended, what="both agents to exit")
        ok_now, bad_now = await hub.status(ok.agent_id), await hub.status(bad.agent_id)
        assert (state(ok_now), ok_now.exit_code) == ("SUCCEEDED", 0)
        assert (state(bad_now), bad_now.exit_code) == ("FAILED", 3)
        assert bad_now.reason == "exited with code 3"
    # The task went in as one argv item, never through a shell.
    log = (federation.home("spoke-b") / "workspaces" / "acme" / "lab" / "logs"
           / f"{ok.agent_id}.log").read_text()
    assert "args: ['0', 'x; rm -rf / $(reboot)']" in log


async def test_max_runtime_ends_timed_out(federation: Federation) -> None:
    async with client(federation) as hub:
        agent = await hub.spawn(spoke="spoke-a", workspace="lab", template="short-lived",
                                task="", params={})

        async def timed_out() -> bool:
            return state(await hub.status(agent.agent_id)) == "TIMED_OUT"

        await eventually(timed_out, what="the agent to time out")
        assert processes_with_marker(agent.agent_id) == []


async def test_template_that_cannot_start_fails_with_reason(federation: Federation) -> None:
    async with client(federation) as hub:
        agent = await hub.spawn(spoke="spoke-a", workspace="lab", template="missing-binary",
                                task="", params={})
        assert state(agent) == "FAILED"
        assert "could not start" in agent.reason


async def test_kill_leaves_no_survivor_even_when_sigterm_is_ignored(
        federation: Federation) -> None:
    async with client(federation) as hub:
        agent = await hub.spawn(spoke="spoke-b", workspace="research", template="stubborn",
                                task="", params={})
        workdir = federation.agent_workdir("spoke-b", "acme", "research", agent.agent_id)
        pids = (workdir / "agent.pid", workdir / "grandchild.pid")
        await eventually(lambda: all(read_pid(agent.agent_id, p) for p in pids),
                         what="the stubborn agent and its grandchild to start")
        root, grandchild = (read_pid(agent.agent_id, p) for p in pids)
        assert root is not None and grandchild is not None
        assert pid_alive(root) and pid_alive(grandchild)

        killed = await hub.kill(agent.agent_id, grace_ms=500)
        assert state(killed) == "KILLED"
        assert "SIGKILL" in killed.reason
        assert not pid_alive(root) and not pid_alive(grandchild)
        assert processes_with_marker(agent.agent_id) == []


async def test_other_tenant_sees_nothing_and_changes_nothing(federation: Federation) -> None:
    async with client(federation) as acme, client(federation, "globex") as globex:
        agent = await acme.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                                 task="secret", params={})
        try:
            with pytest.raises(NotFound) as status_err:
                await globex.status(agent.agent_id)
            with pytest.raises(NotFound) as kill_err:
                await globex.kill(agent.agent_id, grace_ms=0)
            with pytest.raises(NotFound) as absent_err:
                await globex.status("0" * 32)
            # Same shape as an id that never existed: no existence oracle.
            assert status_err.value.message == absent_err.value.message.replace(
                "0" * 32, agent.agent_id)
            assert kill_err.value.message == status_err.value.message
            listed = await globex.list()
            assert agent.agent_id not in {a.agent_id for a in listed.agents}
            assert all(a.tenant == "globex" for a in listed.agents)
            # globex may not spawn into acme's workspace names either.
            with pytest.raises(NotFound):
                await globex.spawn(spoke="spoke-a", workspace="research",
                                   template="sleeper", task="", params={})
            still = await acme.status(agent.agent_id)
            assert state(still) == "RUNNING" and processes_with_marker(agent.agent_id)
        finally:
            await acme.kill(agent.agent_id, grace_ms=2000)


async def test_roles_are_enforced(federation: Federation) -> None:
    async with client(federation) as alice, client(federation, "acme-bob") as bob, \
            client(federation, "acme-viewer") as viewer, \
            client(federation, "acme-admin") as admin:
        agent = await alice.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                                  task="", params={})
        with pytest.raises(PermissionDenied):
            await viewer.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                               task="", params={})
        assert state(await viewer.status(agent.agent_id)) == "RUNNING"
        with pytest.raises(PermissionDenied):
            await viewer.kill(agent.agent_id)
        # bob (operator) sees alice's agent but may not kill it: the spoke decides.
        with pytest.raises(PermissionDenied) as err:
            await bob.kill(agent.agent_id)
        assert "another principal" in err.value.message
        assert state(await alice.status(agent.agent_id)) == "RUNNING"
        # The hub's grant on spoke-a allows at most operator: an admin token is refused
        # there, whatever the hub asserts.
        with pytest.raises(PermissionDenied) as err:
            await admin.kill(agent.agent_id)
        assert "allows at most operator" in err.value.message
        killed = await alice.kill(agent.agent_id, grace_ms=2000)
        assert state(killed) == "KILLED"


async def test_bad_requests_are_refused_and_change_nothing(federation: Federation) -> None:
    async with client(federation) as hub:
        before = {a.agent_id for a in (await hub.list()).agents}
        with pytest.raises(InvalidArgument) as err:
            await hub.spawn(spoke="spoke-a", workspace="research", template="nope",
                            task="", params={})
        assert "unknown template 'nope'" in err.value.message and "sleeper" in err.value.message
        with pytest.raises(NotFound) as err:
            await hub.spawn(spoke="spoke-a", workspace="nope", template="sleeper",
                            task="", params={})
        assert "workspace 'nope' not found" in err.value.message
        with pytest.raises(NotFound):
            await hub.spawn(spoke="spoke-z", workspace="research", template="sleeper",
                            task="", params={})
        with pytest.raises(InvalidArgument):
            await hub.spawn(spoke="spoke-a", workspace="research", template="exit-with",
                            task="", params={"undeclared": "1"})
        with pytest.raises(InvalidArgument):
            await hub.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                            task="a\0b", params={})
        with pytest.raises(InvalidArgument):
            await hub.spawn(spoke="spoke-a", workspace="Not A Slug", template="sleeper",
                            task="", params={})
        with pytest.raises(NotFound):
            await hub.status("f" * 32)
        after = {a.agent_id for a in (await hub.list()).agents}
        assert after == before
