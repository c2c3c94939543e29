"""A spoke that stops leaves its agents running; started again, it re-adopts those whose
pid and start time both match, marks the rest LOST, and never signals a recycled pid."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from hub.client import HubClient
from shared.daemon import STOP_GRACE_SECONDS
from spoke import procfs
from tests.conftest import Federation, build_federation
from tests.integration.helpers import eventually, pid_alive, processes_with_marker, state


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    yield from build_federation(tmp_path_factory.mktemp("restart"))


def kill_marked(agent_id: str) -> None:
    """SIGKILL an agent's processes behind its spoke's back (found by the id marker)."""
    for pid in processes_with_marker(agent_id):
        os.kill(pid, signal.SIGKILL)


def restart_spoke(fed: Federation, name: str, between: Callable[[], None]) -> None:
    old = fed.spokes[name]
    assert old.stop() == 0, "SIGTERM stops the spoke cleanly"
    between()
    fed.spokes[name] = fed.fed.start("spoke", name, listen=old.address)


async def reported(hub: HubClient, agent_id: str, expected: str) -> bool:
    """Whether the hub's registry (fed by the spoke's reports) shows this state."""
    return state(await hub.status(agent_id)) == expected


def set_record(fed: Federation, spoke: str, agent_id: str, **values: object) -> None:
    """Edit a stopped spoke's record directly: stands in for what a crash leaves."""
    with sqlite3.connect(fed.home(spoke) / "state.db") as conn:
        cols = ", ".join(f"{k} = ?" for k in values)
        conn.execute(f"UPDATE agents SET {cols} WHERE agent_id = ?", (*values.values(), agent_id))


async def test_restart_readopts_live_agents_and_marks_gone_ones_lost(fed: Federation) -> None:
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        keep = await hub.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                               task="survives", params={})
        gone = await hub.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                               task="dies while the spoke is away", params={})
        ends = await hub.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                               task="ends after the restart", params={})

        def while_down() -> None:
            assert processes_with_marker(keep.agent_id), "agents outlive their spoke"
            kill_marked(gone.agent_id)

        await asyncio.to_thread(restart_spoke, fed, "spoke-a", while_down)

        # The spoke's verdicts reach the hub's registry as reports.
        await eventually(lambda: reported(hub, gone.agent_id, "LOST"),
                         what="LOST to be reported for the agent that died meanwhile")
        assert state(await hub.status(gone.agent_id, live=True)) == "LOST"
        assert state(await hub.status(keep.agent_id, live=True)) == "RUNNING"

        # An adopted agent that ends is noticed (not our child: no exit code).
        kill_marked(ends.agent_id)

        await eventually(lambda: reported(hub, ends.agent_id, "LOST"),
                         what="the adopted agent's end to be recorded and reported")

        killed = await hub.kill(keep.agent_id, grace_ms=2000)
        assert state(killed) == "KILLED"
        assert processes_with_marker(keep.agent_id) == []


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

            def while_down() -> None:
                kill_marked(agent.agent_id)
                # The record now names an unrelated process's pid with the start time the
                # agent had: exactly what pid reuse looks like.
                set_record(fed, "spoke-b", agent.agent_id, pid=bystander.pid,
                           pid_start_time=real + 12345)

            await asyncio.to_thread(restart_spoke, fed, "spoke-b", while_down)
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
        fed.spokes["spoke-a"] = fed.fed.start("spoke", "spoke-a", listen=old.address)
        assert stopped_in < STOP_GRACE_SECONDS, stopped_in
        assert state(await hub.status(agent.agent_id, live=True)) == "RUNNING"
        assert state(await hub.kill(agent.agent_id, grace_ms=2000)) == "KILLED"
