"""Limits of an agent's whole process tree, enforced by the spoke with real processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.client import HubClient
from spoke.logs import ROTATION_NOTE, rotated
from tests.conftest import AGENTS, Federation, build_federation
from tests.integration.helpers import (
    eventually,
    pid_alive,
    processes_with_marker,
    read_number,
    read_pid,
    state,
)

LIMIT_TEMPLATES = f'''
[templates.busy]
argv = ["{{python}}", "-c", "while True: pass"]
max_runtime_seconds = 1
grace_seconds = 1

[templates.cpu-burner]
argv = ["{{python}}", "-c", "while True: pass"]
max_cpu_seconds = 1
grace_seconds = 1

[templates.hog]
argv = ["{{python}}", "{AGENTS / 'hog.py'}"]
max_memory_mb = 96
grace_seconds = 1

[templates.forker]
argv = ["{{python}}", "{AGENTS / 'forker.py'}"]
max_processes = 12
grace_seconds = 1

[templates.flood]
argv = ["{{python}}", "{AGENTS / 'flood.py'}"]
max_log_mb = 1
grace_seconds = 1

[templates.stubborn-limited]
argv = ["{{python}}", "{AGENTS / 'stubborn.py'}"]
max_processes = 20
grace_seconds = 1

[templates.few-files]
argv = ["{{python}}", "-c",
        "import resource; print('nofile', resource.getrlimit(resource.RLIMIT_NOFILE))"]
max_open_files = 64
'''


@pytest.fixture(scope="module", params=["cgroups", "watchdog-only"])
def fed(request: pytest.FixtureRequest,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """Once with cgroups where the machine allows them, once with the watchdog alone (what
    a machine without cgroup delegation gets)."""
    for f in build_federation(tmp_path_factory.mktemp("limits")):
        f.add_spoke("spoke-lim", tenants={"acme": ["w"]}, start=False)
        config = f.home("spoke-lim") / "config.toml"
        if request.param == "watchdog-only":
            config.write_text(config.read_text().replace("use_cgroups = true",
                                                         "use_cgroups = false"))
        with open(config, "a") as cfg:
            cfg.write(LIMIT_TEMPLATES)
        daemon = f.fed.start("spoke", "spoke-lim")
        f.fed.trust(f.hub.name, "spoke-lim", address=daemon.address)
        f.spokes["spoke-lim"] = daemon
        yield f


async def run_until_end(fed: Federation, template: str, timeout: float = 30):
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-lim", workspace="w", template=template,
                                task="", params={})

        async def ended() -> bool:
            return state(await hub.status(agent.agent_id, live=True)) not in (
                "PENDING", "RUNNING")

        await eventually(ended, timeout=timeout, what=f"the {template} agent to be stopped")
        final = await hub.status(agent.agent_id, live=True)
    assert processes_with_marker(agent.agent_id) == []
    return final


async def test_busy_loop_past_max_runtime_ends_timed_out(fed: Federation) -> None:
    final = await run_until_end(fed, "busy")
    assert state(final) == "TIMED_OUT" and "max_runtime_seconds=1" in final.reason


async def test_cpu_time_limit_stops_the_agent_and_says_so(fed: Federation) -> None:
    final = await run_until_end(fed, "cpu-burner")
    assert state(final) == "FAILED" and "CPU time limit of 1 s" in final.reason


async def test_memory_hog_is_stopped_with_the_memory_reason(fed: Federation) -> None:
    final = await run_until_end(fed, "hog")
    assert state(final) == "FAILED" and "memory limit of 96 MiB" in final.reason


async def test_fork_bomb_stays_within_the_process_limit(fed: Federation) -> None:
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-lim", workspace="w", template="forker",
                                task="", params={})
        workdir = fed.agent_workdir("spoke-lim", "acme", "w", agent.agent_id)
        if "processes by cgroup" in agent.reason:
            # The kernel holds it: forks beyond the limit are refused, the agent lives on.
            await eventually(lambda: read_number(workdir / "forked.txt") is not None,
                             what="the fork bomb to give up")
            assert (read_number(workdir / "forked.txt") or 0) < 12
            assert len(processes_with_marker(agent.agent_id)) <= 12
            assert state(await hub.status(agent.agent_id, live=True)) == "RUNNING"
            await hub.kill(agent.agent_id, grace_ms=1000)
        else:
            # Without cgroups the watchdog cannot hold forks back; it stops the whole tree
            # once past the limit and says so (the README says this too).
            assert "processes by watchdog" in agent.reason

            async def stopped() -> bool:
                return state(await hub.status(agent.agent_id, live=True)) == "FAILED"

            await eventually(stopped, what="the watchdog to stop the fork bomb")
            final = await hub.status(agent.agent_id, live=True)
            assert "process limit of 12 exceeded" in final.reason
    assert processes_with_marker(agent.agent_id) == []


async def test_log_flood_keeps_to_its_cap_and_the_agent_is_unharmed(fed: Federation) -> None:
    """The flood writes as fast as it can; its log (two files) never holds more than the
    cap plus one pipe read, rotates, and keeps the newest output."""
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-lim", workspace="w", template="flood",
                                task="", params={})
        log = Path(fed.home("spoke-lim") / "workspaces" / "acme" / "w" / "logs"
                   / f"{agent.agent_id}.log")
        cap = 1 << 20
        sizes: list[int] = []

        def rotated_twice() -> bool:
            sizes.append(_size(log) + _size(rotated(log)))
            return log.read_bytes().startswith(ROTATION_NOTE) and len(sizes) > 20

        await eventually(rotated_twice, what="the log to rotate")
        assert max(sizes) <= cap + (64 << 10)
        assert state(await hub.status(agent.agent_id, live=True)) == "RUNNING"
        tail = (await hub.logs(agent.agent_id, tail_lines=3)).text
        assert tail and set(tail) <= {"x", "\n"}
        await hub.kill(agent.agent_id, grace_ms=1000)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


async def test_open_files_limit_is_set_for_the_agent(fed: Federation) -> None:
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-lim", workspace="w", template="few-files",
                                task="", params={})

        async def printed() -> bool:
            return "nofile (64, 64)" in (await hub.logs(agent.agent_id)).text

        await eventually(printed, what="the agent to report its limit")


async def test_kill_takes_the_escaped_grandchild_of_a_limited_agent(fed: Federation) -> None:
    """With cgroups the kill finds the agent's processes in its cgroup (setsid does not
    leave it); without, through /proc. Either way nothing is left."""
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-lim", workspace="w", template="stubborn-limited",
                                task="", params={})
        workdir = fed.agent_workdir("spoke-lim", "acme", "w", agent.agent_id)
        await eventually(lambda: read_pid(agent.agent_id, workdir / "grandchild.pid"),
                         timeout=30, what="the escaped grandchild to start")
        grandchild = read_pid(agent.agent_id, workdir / "grandchild.pid")
        assert grandchild is not None
        killed = await hub.kill(agent.agent_id, grace_ms=500)
    assert state(killed) == "KILLED"
    assert "SIGKILL after the grace period" in killed.reason
    assert not pid_alive(grandchild)
    assert processes_with_marker(agent.agent_id) == []
