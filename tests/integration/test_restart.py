"""A spoke that stops leaves its agents running under their supervisors. Started again,
it collects how each agent that ended meanwhile ended (its exit code, not LOST), watches
the others again, marks LOST only agents whose supervisor is gone too (after killing
whatever of them is left), and never signals a recycled pid."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hub.client import HubClient
from shared.daemon import STOP_GRACE_SECONDS
from spoke import procfs
from spoke.shim import SUPERVISOR_FILE, read_json
from tests.conftest import Federation, build_federation
from tests.integration.helpers import eventually, pid_alive, processes_with_marker, state


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    yield from build_federation(tmp_path_factory.mktemp("restart"))


def kill_marked(agent_id: str) -> None:
    """SIGKILL an agent's processes behind its spoke's back (found by the id marker)."""
    for pid in processes_with_marker(agent_id):
        os.kill(pid, signal.SIGKILL)


def supervisor_of(fed: Federation, spoke: str, agent_id: str) -> dict[str, object]:
    found = read_json(fed.home(spoke) / "run" / agent_id / SUPERVISOR_FILE)
    assert found is not None, f"no supervisor record for {agent_id}"
    return found


def workdir(fed: Federation, spoke: str, agent_id: str) -> Path:
    return fed.agent_workdir(spoke, "acme", "research", agent_id)


def tell_to_exit(fed: Federation, spoke: str, agent_id: str, code: int) -> None:
    told = workdir(fed, spoke, agent_id) / "exit"
    told.with_name("exit.tmp").write_text(str(code))
    told.with_name("exit.tmp").chmod(0o644)  # the agent runs as a uid of its own
    told.with_name("exit.tmp").rename(told)  # and never reads it half written


async def heard_since(hub: HubClient, spoke: str, since_ms: int) -> bool:
    """Whether the hub has had a heartbeat from the spoke since since_ms (ONLINE from a
    heartbeat of the run before a restart would go OFFLINE a moment later)."""
    return any(s.name == spoke and s.status == "ONLINE" and s.last_heartbeat_ms >= since_ms
               for s in (await hub.spokes()).spokes)


async def restart_spoke(fed: Federation, hub: HubClient, name: str,
                        between: Callable[[], None]) -> None:
    """Stop the spoke, run between() while it is down, start it again, and wait until
    the hub has its heartbeat (a live status before that would fail)."""
    old = fed.spokes[name]
    assert await asyncio.to_thread(old.stop) == 0, "SIGTERM stops the spoke cleanly"
    await asyncio.to_thread(between)
    started_ms = int(time.time() * 1000)
    fed.spokes[name] = await asyncio.to_thread(fed.fed.start, "spoke", name, old.address)
    await eventually(lambda: heard_since(hub, name, started_ms),
                     what=f"a heartbeat of the restarted {name}")


async def reported(hub: HubClient, agent_id: str, expected: str) -> bool:
    """Whether the hub's registry (fed by the spoke's reports) shows this state."""
    return state(await hub.status(agent_id)) == expected


async def test_exit_codes_of_agents_that_end_while_the_spoke_is_down_survive(
        fed: Federation) -> None:
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        keep = await hub.spawn(spoke="spoke-a", workspace="research", template="until-told",
                               task="outlives the restart", params={})
        exits = await hub.spawn(spoke="spoke-a", workspace="research", template="until-told",
                                task="exits while the spoke is away", params={})
        killed = await hub.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                                 task="killed while the spoke is away", params={})
        await eventually(lambda: (workdir(fed, "spoke-a", exits.agent_id) / "started").exists(),
                         what="the agent to start")

        def while_down() -> None:
            assert processes_with_marker(keep.agent_id), "agents outlive their spoke"
            tell_to_exit(fed, "spoke-a", exits.agent_id, 3)
            kill_marked(killed.agent_id)
            ended = {exits.agent_id: False, killed.agent_id: False}
            deadline = time.monotonic() + 10
            while not all(ended.values()) and time.monotonic() < deadline:
                ended = {a: (fed.home("spoke-a") / "run" / a / "exit.json").exists()
                         for a in ended}
                time.sleep(0.05)
            assert all(ended.values()), "each supervisor recorded its agent's end"

        await restart_spoke(fed, hub, "spoke-a", while_down)

        gone = await hub.status(exits.agent_id, live=True)
        assert state(gone) == "FAILED" and gone.exit_code == 3, gone
        assert "exited with code 3" in gone.reason
        shot = await hub.status(killed.agent_id, live=True)
        assert state(shot) == "FAILED" and "SIGKILL" in shot.reason, shot
        # Reports carry the same to the hub's registry.
        await eventually(lambda: reported(hub, exits.agent_id, "FAILED"),
                         what="the collected end to be reported")
        assert state(await hub.status(keep.agent_id, live=True)) == "RUNNING"

        # The re-adopted agent's own end, after the restart, has its code too.
        tell_to_exit(fed, "spoke-a", keep.agent_id, 0)
        await eventually(lambda: reported(hub, keep.agent_id, "SUCCEEDED"),
                         what="the re-adopted agent's end to be recorded with its code")
        assert not (fed.home("spoke-a") / "run" / keep.agent_id).exists()


async def test_an_agent_whose_supervisor_is_gone_is_lost_and_nothing_of_it_runs(
        fed: Federation) -> None:
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-b", workspace="research", template="stubborn",
                                task="", params={})
        await eventually(lambda: (workdir(fed, "spoke-b", agent.agent_id)
                                  / "grandchild.pid").exists(), what="the grandchild")
        record = supervisor_of(fed, "spoke-b", agent.agent_id)

        def while_down() -> None:
            # The supervisor dies without a word: its agent's namespace goes with it.
            os.kill(int(str(record["pid"])), signal.SIGKILL)
            deadline = time.monotonic() + 10
            while processes_with_marker(agent.agent_id) and time.monotonic() < deadline:
                time.sleep(0.05)

        await restart_spoke(fed, hub, "spoke-b", while_down)
        assert processes_with_marker(agent.agent_id) == []
        lost = await hub.status(agent.agent_id, live=True)
        assert state(lost) == "LOST" and "supervisor was gone" in lost.reason, lost
        # A kill of a LOST agent says what it found, and nothing of it is left.
        again = await hub.kill(agent.agent_id, grace_ms=0)
        assert state(again) == "LOST"


async def test_recycled_pid_is_never_signalled(fed: Federation) -> None:
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-b", workspace="research", template="sleeper",
                                task="", params={})
        bystander = subprocess.Popen(  # noqa: ASYNC220 (a plain process, not awaited)
            [sys.executable, "-c", "import time; time.sleep(600)"],
            start_new_session=True)
        try:
            real = procfs.start_time(bystander.pid)
            assert real is not None
            path = fed.home("spoke-b") / "run" / agent.agent_id / SUPERVISOR_FILE
            record = supervisor_of(fed, "spoke-b", agent.agent_id)

            def while_down() -> None:
                os.kill(int(str(record["pid"])), signal.SIGKILL)
                # The record now names an unrelated process's pid with the start time
                # the supervisor had: exactly what pid reuse looks like.
                path.write_text(json.dumps({**record, "pid": bystander.pid,
                                            "start_time": real + 12345}))

            await restart_spoke(fed, hub, "spoke-b", while_down)
            await eventually(lambda: reported(hub, agent.agent_id, "LOST"),
                             what="LOST to be reported")
            killed = await hub.kill(agent.agent_id, grace_ms=0)
            assert state(killed) == "LOST"
            assert pid_alive(bystander.pid), "the unrelated process at the recorded pid lives"
        finally:
            bystander.kill()
            bystander.wait()


async def test_a_spoke_with_the_hubs_stream_open_stops_at_once_and_is_commanded_after(
        fed: Federation) -> None:
    """The hub keeps a command stream open to each spoke it commands (ADR 0021). A
    spoke ends its streams before it stops, so the stop does not wait out its grace;
    the hub's next command after the restart goes on a new stream."""
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                                task="outlives a restart", params={})
        assert state(await hub.status(agent.agent_id, live=True)) == "RUNNING"
        old = fed.spokes["spoke-a"]
        started = time.monotonic()
        assert old.stop() == 0
        stopped_in = time.monotonic() - started
        started_ms = int(time.time() * 1000)
        fed.spokes["spoke-a"] = fed.fed.start("spoke", "spoke-a", listen=old.address)
        assert stopped_in < STOP_GRACE_SECONDS, stopped_in
        await eventually(lambda: heard_since(hub, "spoke-a", started_ms),
                         what="a heartbeat of the restarted spoke-a")
        assert state(await hub.status(agent.agent_id, live=True)) == "RUNNING"
        assert state(await hub.kill(agent.agent_id, grace_ms=2000)) == "KILLED"
