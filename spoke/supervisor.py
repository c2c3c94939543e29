"""AgentSupervisor: the spoke's side of its agents' supervisors.

Each agent has a supervisor process of its own (spoke/shim.py), started through the
launcher (spoke/launcher.py), that outlives the spoke. The spoke watches that process
on a pidfd, asks it for kills (kill.json, then SIGTERM), and when it exits reads how the
agent ended from its exit.json and records that. A restarted spoke finds the supervisors
a previous run left and collects what they recorded meanwhile (see recover in
spoke/commands.py). Where a supervisor died without a record, whatever is left of its
agent is found through the agent's cgroups or its environment marker and killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from spoke import procfs
from spoke.launcher import Launcher
from spoke.limits import CgroupPlan, Limits, tree_usage
from spoke.shim import EXIT_FILE, KILL_FILE, ShimPlan, read_json, write_json

log = logging.getLogger(__name__)

WATCHDOG_SECONDS = 0.25
# After SIGKILL, how long to keep sweeping for what a supervisor-less agent left.
KILL_SWEEP_SECONDS = 5.0

def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit, and return it: the
    spoke waits for each live agent's supervisor on a pidfd, one open file per agent.
    The soft limit is 1,024 on many systems for the sake of select(); nothing here uses
    select()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


@dataclass(frozen=True)
class Launched:
    """The agent's supervisor: what the spoke records, finds again and signals."""

    pid: int
    start_time: int


@dataclass(frozen=True)
class Ending:
    """How an agent ended, for the record."""

    state: str  # SUCCEEDED | FAILED | KILLED | TIMED_OUT | LOST
    exit_code: int | None
    reason: str
    # For kills: who asked, and the command's message_id.
    by: str = ""
    message_id: str = ""


# What the supervisor's owner records of an agent's end (the spoke: its new state).
Recorded = TypeVar("Recorded")


@dataclass
class _Watched(Generic[Recorded]):
    agent_id: str
    run_dir: Path
    launched: Launched
    limits: Limits
    cgroups: CgroupPlan
    isolated: bool
    # The template's grace, for the watchdog's kills.
    grace_seconds: float
    kill_asked: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # What on_exit returned, once done.
    recorded: Recorded | None = None
    watcher: asyncio.Task[None] | None = None


class AgentSupervisor(Generic[Recorded]):
    def __init__(self, launcher: Launcher, isolated: bool,
                 on_exit: Callable[[str, Ending], Awaitable[Recorded]]) -> None:
        self._launcher = launcher
        self._isolated = isolated
        self._on_exit = on_exit
        self._running: dict[str, _Watched[Recorded]] = {}
        # Agents whose supervisor is starting: a kill meanwhile waits for the start.
        self._starting: dict[str, asyncio.Event] = {}

    def is_supervised(self, agent_id: str) -> bool:
        return agent_id in self._running or agent_id in self._starting

    async def launch(self, plan: ShimPlan, limits: Limits,
                     claim_fd: int | None = None) -> Launched:
        """Start the agent under a supervisor of its own; call watch() once its start is
        recorded. Raises LaunchFailed (nothing of the agent runs) with the reason."""
        starting = self._starting[plan.agent_id] = asyncio.Event()
        try:
            started = await self._launcher.launch(plan, claim_fd)
            launched = Launched(started.pid, started.start_time)
            self._running[plan.agent_id] = _Watched(
                agent_id=plan.agent_id, run_dir=Path(plan.run_dir), launched=launched,
                limits=limits, cgroups=CgroupPlan(dirs=started.cgroups),
                isolated=self._isolated, grace_seconds=plan.grace_seconds)
        finally:
            if claim_fd is not None:
                os.close(claim_fd)  # the supervisor holds it now
            del self._starting[plan.agent_id]
            starting.set()
        return launched

    def adopt(self, agent_id: str, run_dir: Path, launched: Launched, limits: Limits,
              cgroups: CgroupPlan, *, isolated: bool, grace_seconds: float) -> None:
        """Watch a supervisor a previous spoke run started (its pid and start time
        matched)."""
        self._running[agent_id] = _Watched(
            agent_id=agent_id, run_dir=run_dir, launched=launched, limits=limits,
            cgroups=cgroups, isolated=isolated, grace_seconds=grace_seconds)
        self.watch(agent_id)

    def watch(self, agent_id: str) -> None:
        run = self._running[agent_id]
        run.watcher = asyncio.create_task(self._watch(run), name=f"agent-{agent_id}")

    async def _watch(self, run: _Watched[Recorded]) -> None:
        watchdog = (asyncio.create_task(self._watchdog(run))
                    if _watched(run.limits) else None)
        await procfs.wait_exit(run.launched.pid, run.launched.start_time)
        if watchdog is not None:
            watchdog.cancel()
        ending = await asyncio.to_thread(collect, run.run_dir, run.agent_id, run.cgroups)
        try:
            run.recorded = await self._on_exit(run.agent_id, ending)
            await asyncio.to_thread(forget, run.run_dir)
        except Exception:
            log.exception("recording the end of agent %s failed", run.agent_id)
        finally:
            self._running.pop(run.agent_id, None)
            run.done.set()

    async def kill(self, agent_id: str, grace_seconds: float, reason: str, *,
                   state: str = "KILLED", by: str = "", message_id: str = ""
                   ) -> Recorded | None:
        """Ask the agent's supervisor to kill it and wait until its end is recorded;
        what on_exit returned for it (None if it was not supervised, or recording
        failed). The first kill's reason stands."""
        if agent_id in self._starting:
            await self._starting[agent_id].wait()
        run = self._running.get(agent_id)
        if run is None:
            return None
        _ask_kill(run, {"grace_seconds": grace_seconds, "state": state, "reason": reason,
                        "by": by, "message_id": message_id})
        await run.done.wait()
        return run.recorded

    async def _watchdog(self, run: _Watched[Recorded]) -> None:
        """Stop the agent once its tree is past a limit no cgroup enforces here."""
        limits = run.limits
        while True:
            await asyncio.sleep(WATCHDOG_SECONDS)
            counted = run.cgroups.usage()
            if not {"memory", "cpu", "pids"} <= counted.keys():
                usage = tree_usage(await asyncio.to_thread(self._tree, run))
                counted.setdefault("memory", usage.memory_bytes)
                counted.setdefault("cpu", usage.cpu_seconds)
                counted.setdefault("pids", usage.processes)
            breach = _breach(limits, counted)
            if breach:
                _ask_kill(run, {"grace_seconds": run.grace_seconds, "state": "FAILED",
                                "reason": f"stopped by the spoke: {breach}"})
                return

    @staticmethod
    def _tree(run: _Watched[Any]) -> list[procfs.ProcStat]:
        """The agent's processes (its init, if isolated, left out)."""
        found = run.cgroups.processes()
        if found is None:
            pids = procfs.descendants(run.launched.pid)
            if run.isolated and pids:
                pids = pids[1:]
            stats = (procfs.read_stat(p) for p in pids)
            found = [st for st in stats if st is not None and st.alive]
        return found

    def detach(self) -> None:
        """Stop watching (daemon shutdown); the agents and supervisors keep running."""
        for run in self._running.values():
            if run.watcher is not None:
                run.watcher.cancel()
        self._running.clear()


def _ask_kill(run: _Watched[Any], request: dict[str, Any]) -> None:
    """Leave the kill request where the supervisor reads it, then signal it."""
    if run.kill_asked:
        return
    run.kill_asked = True
    write_json(run.run_dir / KILL_FILE, request)
    procfs.signal_pid(run.launched.pid, run.launched.start_time, signal.SIGTERM)


def collect(run_dir: Path, agent_id: str, cgroups: CgroupPlan) -> Ending:
    """How the agent of a supervisor that has exited ended: from its exit.json, or, if
    it left none, LOST, after killing whatever of the agent is left."""
    record = read_json(run_dir / EXIT_FILE)
    if record is not None:
        return ending_of(record)
    sweep(agent_id, cgroups)
    return Ending("LOST", None, "its supervisor ended without recording how the agent "
                                "ended; whatever was left of it was killed")


def forget(run_dir: Path) -> None:
    """Remove a collected supervisor's run folder."""
    shutil.rmtree(run_dir, ignore_errors=True)


def ending_of(record: dict[str, Any]) -> Ending:
    """The Ending an exit.json describes."""
    if record.get("error"):
        return Ending("FAILED", None, str(record["error"]))
    status = record.get("status")
    code = os.waitstatus_to_exitcode(status) if isinstance(status, int) else None
    how = "SIGKILL after the grace period" if record.get("escalated") else "SIGTERM"
    kill = record.get("kill")
    limits = record.get("limits") or {}
    if isinstance(kill, dict):
        return Ending(str(kill.get("state", "KILLED")), code, f"{kill.get('reason', '')} "
                      f"({how})", str(kill.get("by", "")), str(kill.get("message_id", "")))
    if code == -signal.SIGKILL and record.get("memory_limit_hit"):
        return Ending("FAILED", code, "killed by the kernel: memory limit of "
                                      f"{limits.get('memory_mb', '?')} MiB reached")
    if code == -signal.SIGXCPU and limits.get("cpu_seconds"):
        return Ending("FAILED", code, f"CPU time limit of {limits['cpu_seconds']} s reached "
                                      "(SIGXCPU)")
    if record.get("timed_out"):
        return Ending("TIMED_OUT", code, "ran past max_runtime_seconds="
                                         f"{record.get('max_runtime_seconds', 0):g} ({how})")
    if code is None:
        return Ending("LOST", None, "its supervisor could not tell how it ended")
    if code == 0:
        return Ending("SUCCEEDED", 0, "exited with code 0")
    if code < 0:
        return Ending("FAILED", code, f"ended by signal {signal.Signals(-code).name}")
    return Ending("FAILED", code, f"exited with code {code}")


def sweep(agent_id: str, cgroups: CgroupPlan, root: Launched | None = None) -> int:
    """Kill whatever is left of an agent whose supervisor is gone: through its cgroups,
    else by its environment marker (and, for an agent recorded by pid alone, its session
    and process group). How many processes were found. Blocking: run it in a thread."""
    cgroups.kill()
    found = 0
    for _ in range(int(KILL_SWEEP_SECONDS / 0.02)):
        procs = cgroups.processes()
        if procs is None:
            procs = procfs.agent_processes(root.pid if root else 0,
                                           root.start_time if root else 0, agent_id)
        if not procs:
            break
        found = max(found, len(procs))
        for proc in procs:
            procfs.signal_process(proc, signal.SIGKILL)
        time.sleep(0.02)
    cgroups.remove()
    return found


def _watched(limits: Limits) -> bool:
    return bool(limits.memory_mb or limits.cpu_seconds or limits.processes)


def _breach(limits: Limits, usage: dict[str, float]) -> str:
    """Which limit the tree is past, for the record; '' if none."""
    if limits.memory_mb and usage["memory"] > limits.memory_mb << 20:
        return (f"memory limit of {limits.memory_mb} MiB exceeded "
                f"({usage['memory'] / (1 << 20):.0f} MiB)")
    if limits.cpu_seconds and usage["cpu"] > limits.cpu_seconds:
        return f"CPU time limit of {limits.cpu_seconds} s exceeded ({usage['cpu']:.1f} s)"
    if limits.processes and usage["pids"] > limits.processes:
        return f"process limit of {limits.processes} exceeded ({usage['pids']:.0f})"
    return ""
