"""Agents under their supervisors, started through a real launcher: how they end, what is
recorded, kills, limits of time, what they leave behind, and uids. No daemons: the
launcher, supervisors, inits and agents are real processes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from spoke import procfs
from spoke.isolation import UidPool
from spoke.launcher import Launcher, LaunchFailed, Started
from spoke.limits import CgroupSupport, Limits
from spoke.sandbox import FULL, NONE, View
from spoke.shim import EXIT_FILE, KILL_FILE, ShimPlan, SpokeSide, read_json, write_json
from spoke.supervisor import ending_of
from tests.integration.helpers import eventually

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts agents as root")

# A range of its own, so these agents never take a uid a spoke of another test holds.
UID_BASE = 1879048192 + 60000


class Agents:
    """Starts agents in one home, each under its own supervisor."""

    def __init__(self, home: Path, launcher: Launcher, level: str,
                 claims: Path) -> None:
        self.home, self.launcher, self.level = home, launcher, level
        self.uids = UidPool(UID_BASE, 50, claims)
        self.cgroups = CgroupSupport(f"test-{os.getpid()}")
        self.side = SpokeSide(level=level, view=View(
            home=str(home), expose=(sys.prefix, sys.base_prefix,
                                    str(Path(__file__).parents[2]))),
            cgroup_bases={c: str(b) for c, b in self.cgroups.bases.items()},
            run_root=str(home / "run"))
        self._n = 0

    def plan(self, argv: list[str], **options: object) -> ShimPlan:
        self._n += 1
        agent_id = f"{self._n:032x}"
        workdir = self.home / "workspaces" / "t" / "w" / "agents" / agent_id
        limits = options.pop("limits", Limits())
        assert isinstance(limits, Limits)
        return ShimPlan(
            agent_id=agent_id, argv=argv, env={"PATH": "/usr/bin:/bin", "MARK": agent_id,
                                               procfs.AGENT_ENV: agent_id},
            workdir=str(workdir), network=bool(options.pop("network", True)),
            log_path=str(self.home / "workspaces" / "t" / "w" / "logs" / f"{agent_id}.log"),
            log_cap_bytes=int(options.pop("log_cap", 1 << 20)),
            run_dir=str(self.home / "run" / agent_id),
            max_runtime_seconds=float(options.pop("runtime", 60)),
            grace_seconds=float(options.pop("grace", 1)),
            cgroup_settings=self.cgroups.settings(limits),
            limits={"memory_mb": limits.memory_mb}, **options)  # type: ignore[arg-type]

    async def start(self, plan: ShimPlan) -> tuple[ShimPlan, Started]:
        claim = None
        if self.level == FULL:
            uid, claim = self.uids.claim()
            plan = ShimPlan(**{**plan.__dict__, "uid": uid, "gid": uid})
        try:
            return plan, await self.launcher.launch(plan, claim)
        finally:
            if claim is not None:
                os.close(claim)

    async def run(self, argv: list[str], **options: object) -> tuple[ShimPlan, dict]:
        """Start an agent and wait for its supervisor to record its end."""
        plan, started = await self.start(self.plan(argv, **options))
        record = await ended(plan, started)
        return plan, record


async def ended(plan: ShimPlan, started: Started, timeout: float = 30) -> dict:
    await asyncio.wait_for(procfs.wait_exit(started.pid, started.start_time), timeout)
    record = read_json(Path(plan.run_dir) / EXIT_FILE)
    assert record is not None, (Path(plan.run_dir) / "supervisor.log").read_text()
    return record


def ask_kill(plan: ShimPlan, started: Started, grace: float, reason: str = "test") -> None:
    write_json(Path(plan.run_dir) / KILL_FILE, {"grace_seconds": grace, "state": "KILLED",
                                                "reason": reason, "by": "tester"})
    assert procfs.signal_pid(started.pid, started.start_time, signal.SIGTERM)


def marked(agent_id: str) -> list[int]:
    from tests.integration.helpers import processes_with_marker

    return processes_with_marker(agent_id)


def ids_of(pid: int) -> dict[str, list[str]]:
    """Uid, Gid, Groups... of a process, from /proc/PID/status."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {line.split(":")[0]: line.split()[1:] for line in status}


def log_sizes(plan: ShimPlan) -> tuple[int, str]:
    """LOG and LOG.1 together, and LOG's last line."""
    log = Path(plan.log_path)
    rotated = log.with_name(log.name + ".1")
    return log.stat().st_size + rotated.stat().st_size, log.read_text().splitlines()[-1]


def log_of(plan: ShimPlan) -> str:
    return Path(plan.log_path).read_text()


@pytest.fixture(params=[FULL, NONE])
async def agents(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Agents]:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    launcher = Launcher(home / "run", UID_BASE)
    await launcher.fence()
    probed = await launcher.start()
    assert probed[FULL] == "", probed
    found = Agents(home, launcher, request.param, tmp_path / "claims")
    await launcher.configure(found.side)
    try:
        yield found
    finally:
        await launcher.close()
        found.cgroups.close()


async def test_the_exit_code_and_output_are_recorded(agents: Agents) -> None:
    plan, record = await agents.run(["sh", "-c", "echo out; echo err >&2; exit 3"])
    ending = ending_of(record)
    assert (ending.state, ending.exit_code) == ("FAILED", 3)
    assert log_of(plan) == "out\nerr\n"
    _, record = await agents.run(["sh", "-c", "kill -USR1 $$"])
    assert ending_of(record).reason == "ended by signal SIGUSR1"


async def test_a_program_that_cannot_start_is_refused_with_the_reason(agents: Agents) -> None:
    plan = agents.plan(["/nonexistent/program"])
    with pytest.raises(LaunchFailed, match="could not start '/nonexistent/program': No such"):
        await agents.start(plan)
    await eventually(lambda: (Path(plan.run_dir) / EXIT_FILE).exists(), what="exit.json")
    assert ending_of(read_json(Path(plan.run_dir) / EXIT_FILE) or {}).state == "FAILED"


async def test_a_kill_ends_what_ignores_sigterm_and_what_escaped_with_setsid(
        agents: Agents) -> None:
    stubborn = Path(__file__).parents[1] / "agents" / "stubborn.py"
    plan, started = await agents.start(agents.plan([sys.executable, str(stubborn)]))
    workdir = Path(plan.workdir)
    await eventually(lambda: (workdir / "grandchild.pid").exists(), what="the grandchild")
    assert len(marked(plan.agent_id)) == 2
    ask_kill(plan, started, grace=0.3)
    record = await ended(plan, started)
    ending = ending_of(record)
    assert ending.state == "KILLED" and "SIGKILL after the grace period" in ending.reason
    assert ending.by == "tester"
    assert marked(plan.agent_id) == []


async def test_sigterm_is_enough_for_an_agent_that_heeds_it(agents: Agents) -> None:
    plan, started = await agents.start(agents.plan(["sleep", "60"]))
    ask_kill(plan, started, grace=10)
    ending = ending_of(await ended(plan, started, timeout=5))
    assert ending.state == "KILLED" and ending.reason == "test (SIGTERM)"


async def test_max_runtime_ends_the_agent_timed_out(agents: Agents) -> None:
    _, record = await agents.run(["sleep", "60"], runtime=0.3)
    ending = ending_of(record)
    assert ending.state == "TIMED_OUT" and "max_runtime_seconds=0.3" in ending.reason


async def test_what_the_first_process_leaves_running_is_ended_with_it(
        agents: Agents) -> None:
    plan, record = await agents.run(["sh", "-c", "setsid sleep 60 & sleep 60 & exit 0"])
    assert ending_of(record).state == "SUCCEEDED"
    assert marked(plan.agent_id) == []


async def test_kept_descendants_hold_the_agent_and_are_still_killed(agents: Agents) -> None:
    plan, started = await agents.start(agents.plan(
        ["sh", "-c", "setsid sleep 60 & exit 4"], keep_descendants=True))
    await eventually(lambda: len(marked(plan.agent_id)) == 1, what="the first process to end")
    assert procfs.is_same_process(started.pid, started.start_time), "still supervised"
    ask_kill(plan, started, grace=1)
    record = await ended(plan, started)
    assert ending_of(record).state == "KILLED" and marked(plan.agent_id) == []


async def test_agents_outlive_the_launcher_and_are_killed_after(agents: Agents) -> None:
    plan, started = await agents.start(agents.plan(["sleep", "60"]))
    await agents.launcher.close()  # what a stopping spoke does
    assert marked(plan.agent_id), "the agent runs on"
    ask_kill(plan, started, grace=1)
    assert ending_of(await ended(plan, started)).state == "KILLED"


async def test_a_supervisor_that_dies_takes_its_isolated_agent_with_it(tmp_path: Path,
                                                                      agents: Agents) -> None:
    if agents.level == NONE:
        pytest.skip("without namespaces the agent is orphaned; the spoke sweeps it")
    plan, started = await agents.start(agents.plan(["sleep", "60"]))
    os.kill(started.pid, signal.SIGKILL)
    await eventually(lambda: marked(plan.agent_id) == [], what="the namespace to end")
    assert not (Path(plan.run_dir) / EXIT_FILE).exists()


async def test_every_agent_has_a_uid_of_its_own_given_back_at_its_end(
        agents: Agents) -> None:
    if agents.level != FULL:
        pytest.skip("uids are given with isolation full")
    running = [await agents.start(agents.plan(["sleep", "60"])) for _ in range(3)]
    uids = {plan.uid for plan, _ in running}
    assert len(uids) == 3 and all(UID_BASE <= u < UID_BASE + 50 for u in uids)
    for plan, started in running:
        ids = ids_of(marked(plan.agent_id)[0])
        assert ids["Uid"] == ids["Gid"] == [str(plan.uid)] * 4 and ids["Groups"] == []
        ask_kill(plan, started, grace=1)
        await ended(plan, started)
    assert sorted(os.listdir(agents.uids._claims)) == []


async def test_a_log_keeps_to_its_cap_and_the_newest_output(agents: Agents) -> None:
    script = "import sys\nfor i in range(40000): print(f'line {i:06d} ' + 'x' * 40)"
    plan, record = await agents.run([sys.executable, "-c", script], log_cap=256 << 10)
    assert ending_of(record).state == "SUCCEEDED"
    size, last = log_sizes(plan)
    assert size <= 256 << 10 and last.startswith("line 039999 ")


async def test_network_none_leaves_only_loopback(agents: Agents) -> None:
    if agents.level == NONE:
        pytest.skip("a network namespace needs isolation")
    probe = ("import json, socket\n"
             "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
             "c = socket.create_connection(s.getsockname()); ok = True\n"
             "try:\n socket.create_connection(('10.255.255.1', 9), timeout=2); out = 'out'\n"
             "except OSError as e:\n out = e.errno\n"
             "print(json.dumps({'loopback': ok, 'outside': out}))")
    plan, record = await agents.run([sys.executable, "-c", probe], network=False)
    assert ending_of(record).state == "SUCCEEDED", log_of(plan)
    seen = json.loads(log_of(plan))
    assert seen["loopback"] is True and seen["outside"] != "out"


async def test_a_supervisor_that_could_not_get_ready_says_so_to_its_spawn(
        tmp_path: Path) -> None:
    """Its cgroups cannot be made (here: a base under /proc): the spawn that comes for it
    is refused with the reason, and nothing runs."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    launcher = Launcher(home / "run", UID_BASE)
    await launcher.fence()
    await launcher.start()
    agents = Agents(home, launcher, NONE, tmp_path / "claims")
    agents.side = SpokeSide(level=NONE, view=agents.side.view,
                            cgroup_bases={"v2": "/proc/fleetwire-no-such-cgroup"}, warm=1)
    await launcher.configure(agents.side)
    try:
        plan = agents.plan(["sleep", "60"])
        with pytest.raises(LaunchFailed, match="cannot prepare the agent's supervisor: "):
            await agents.start(plan)
        assert marked(plan.agent_id) == []
    finally:
        await launcher.close()
        agents.cgroups.close()
