"""AgentSupervisor: starts agent processes, watches them, and kills whole agents.

Each agent gets its own session and process group (start_new_session; no Python code
runs between fork and exec), a working folder, a log file its stdout and stderr go
straight to, and a filtered environment carrying an id marker. Killing is SIGTERM to
every process of the agent, the grace period, then SIGKILL until nothing of it is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from spoke import procfs
from spoke.launch import launcher_argv
from spoke.limits import AgentCgroups, Limits, cap_log, tree_usage

log = logging.getLogger(__name__)

POLL_SECONDS = 0.05
FIRST_POLL_SECONDS = 0.002
# After SIGKILL, how long to keep sweeping for processes that forked meanwhile.
KILL_SWEEP_SECONDS = 5.0


def raise_open_file_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit, and return it: the
    spoke waits for each live agent on a pidfd, one open file per agent (the way
    Python 3.12 and later watch children themselves). The soft limit is 1,024 on many
    systems for the sake of select(); nothing here uses select()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            return hard
    return soft


@dataclass(frozen=True)
class LaunchSpec:
    agent_id: str
    argv: list[str]
    workdir: Path
    log_path: Path
    env: dict[str, str]
    max_runtime_seconds: float
    grace_seconds: float
    limits: Limits = field(default_factory=Limits)
    cgroups: AgentCgroups | None = None


@dataclass(frozen=True)
class Launched:
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
class _Running(Generic[Recorded]):
    spec: LaunchSpec
    # None for an agent adopted after a restart: not our child, watched through /proc.
    proc: subprocess.Popen[bytes] | None
    launched: Launched
    runtime_left: float
    kill_reason: str = ""
    # Set by the watchdog when the agent went past a limit.
    limit_reason: str = ""
    kill_by: str = ""
    kill_message_id: str = ""
    timed_out: bool = False
    escalated: bool = False
    # The kill's last look found nothing of the agent left: no sweep needed after it.
    cleared: bool = False
    # The running SIGTERM/grace/SIGKILL sequence, if one was started.
    terminator: asyncio.Task[None] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    # What on_exit returned, once done.
    recorded: Recorded | None = None
    watcher: asyncio.Task[None] | None = None


class AgentSupervisor(Generic[Recorded]):
    def __init__(self, on_exit: Callable[[str, Ending], Awaitable[Recorded]]) -> None:
        self._on_exit = on_exit
        self._running: dict[str, _Running[Recorded]] = {}

    def is_supervised(self, agent_id: str) -> bool:
        return agent_id in self._running

    def launch(self, spec: LaunchSpec) -> Launched:
        """Start the agent's first process; call watch() once its start is recorded."""
        spec.workdir.mkdir(parents=True, exist_ok=True)
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_fd = os.open(spec.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            # Not asyncio's subprocess: its watcher starts a thread per child on Python
            # 3.11 (half of a launch here), and its transport kills a child still running
            # when it is collected, as at a spoke's shutdown; agents outlive their spoke.
            # The exit is waited for on a pidfd (_first_process_gone).
            proc = subprocess.Popen(
                launch_argv(spec),
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                cwd=spec.workdir,
                env=spec.env,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(log_fd)
        started = procfs.start_time(proc.pid)
        if started is None:
            # Already gone: the exit is still reaped by watch(); 0 marks "unknown".
            started = 0
        launched = Launched(pid=proc.pid, start_time=started)
        self._running[spec.agent_id] = _Running(spec=spec, proc=proc, launched=launched,
                                                runtime_left=spec.max_runtime_seconds)
        return launched

    def adopt(self, spec: LaunchSpec, launched: Launched, runtime_left: float) -> None:
        """Supervise an agent a previous spoke run started (pid and start time matched)."""
        self._running[spec.agent_id] = _Running(spec=spec, proc=None, launched=launched,
                                                runtime_left=max(runtime_left, 0.0))
        self.watch(spec.agent_id)

    def watch(self, agent_id: str) -> None:
        run = self._running[agent_id]
        run.watcher = asyncio.create_task(self._watch(run), name=f"agent-{agent_id}")

    async def _watch(self, run: _Running[Recorded]) -> None:
        watchdog = (asyncio.create_task(self._watchdog(run))
                    if _watched(run.spec.limits) else None)
        try:
            await asyncio.wait_for(asyncio.shield(self._first_process_gone(run)),
                                   timeout=run.runtime_left)
        except TimeoutError:
            run.timed_out = True
            self._terminate(run, run.spec.grace_seconds)
        code = await self._first_process_gone(run)
        if watchdog is not None:
            watchdog.cancel()
        if run.terminator is not None:
            # The first process may die before the sequence ends; let it finish so the
            # record says whether SIGKILL was needed.
            await run.terminator
        # Like a service manager: when the agent's first process is gone, what it left
        # behind goes too (unless a kill has just seen that nothing is left).
        if not run.cleared:
            await asyncio.to_thread(self._sweep, run.spec.agent_id, run.launched,
                                    run.spec.cgroups)
        ending = self._ending(run, code)
        if run.spec.cgroups is not None:
            run.spec.cgroups.remove()
        try:
            run.recorded = await self._on_exit(run.spec.agent_id, ending)
        except Exception:
            log.exception("recording the end of agent %s failed", run.spec.agent_id)
        finally:
            self._running.pop(run.spec.agent_id, None)
            run.done.set()

    @staticmethod
    async def _first_process_gone(run: _Running[Any]) -> int | None:
        """The exit code of our child, or None for an adopted agent (not ours to reap)."""
        if run.proc is not None:
            # Our child, not yet reaped: its pid cannot be another's meanwhile.
            while (code := run.proc.poll()) is None:
                await procfs.wait_exit(run.proc.pid, None)
            return code
        await procfs.wait_exit(run.launched.pid, run.launched.start_time)
        return None

    @staticmethod
    def _ending(run: _Running[Any], code: int | None) -> Ending:
        how = "SIGKILL after the grace period" if run.escalated else "SIGTERM"
        if run.kill_reason:
            return Ending("KILLED", code, f"{run.kill_reason} ({how})", run.kill_by,
                          run.kill_message_id)
        if run.limit_reason:
            return Ending("FAILED", code, f"stopped by the spoke: {run.limit_reason} ({how})")
        limits, groups = run.spec.limits, run.spec.cgroups
        if code == -signal.SIGKILL and groups is not None and groups.memory_limit_hit():
            return Ending("FAILED", code, f"killed by the kernel: memory limit of "
                                          f"{limits.memory_mb} MiB reached")
        if code == -signal.SIGXCPU and limits.cpu_seconds:
            return Ending("FAILED", code, f"CPU time limit of {limits.cpu_seconds} s reached "
                                          "(SIGXCPU)")
        if run.timed_out:
            return Ending("TIMED_OUT", code,
                          f"ran past max_runtime_seconds={run.spec.max_runtime_seconds:g} "
                          f"({how})")
        if code is None:
            return Ending("LOST", None, "ended while supervised only by pid after a spoke "
                                        "restart; its exit code is unknown")
        if code == 0:
            return Ending("SUCCEEDED", 0, "exited with code 0")
        if code < 0:
            return Ending("FAILED", code, f"ended by signal {signal.Signals(-code).name}")
        return Ending("FAILED", code, f"exited with code {code}")

    async def kill(self, agent_id: str, grace_seconds: float, reason: str, *, by: str = "",
                   message_id: str = "") -> Recorded | None:
        """Kill a supervised agent and wait until its end is recorded; what on_exit
        returned for it (None if it was not supervised, or recording failed)."""
        run = self._running.get(agent_id)
        if run is None:
            return None
        if not run.kill_reason:
            run.kill_reason, run.kill_by, run.kill_message_id = reason, by, message_id
            self._terminate(run, grace_seconds)
        await run.done.wait()
        return run.recorded

    async def _watchdog(self, run: _Running[Recorded]) -> None:
        """Stop the agent once its tree is past a limit; keep its log under the cap."""
        limits, groups = run.spec.limits, run.spec.cgroups
        while True:
            await asyncio.sleep(WATCHDOG_SECONDS)
            if limits.log_mb and cap_log(run.spec.log_path, limits.log_mb << 20):
                log.info("agent %s: log cut at %d MiB", run.spec.agent_id, limits.log_mb)
            counted = groups.usage() if groups is not None else {}
            if not {"memory", "cpu", "pids"} <= counted.keys():
                procs = await asyncio.to_thread(
                    procfs.agent_processes, run.launched.pid, run.launched.start_time,
                    run.spec.agent_id)
                usage = tree_usage(procs)
                counted.setdefault("memory", usage.memory_bytes)
                counted.setdefault("cpu", usage.cpu_seconds)
                counted.setdefault("pids", usage.processes)
            breach = _breach(limits, counted)
            if breach and not run.kill_reason:
                run.limit_reason = breach
                self._terminate(run, run.spec.grace_seconds)
                return

    def _terminate(self, run: _Running[Recorded], grace_seconds: float) -> None:
        if run.terminator is not None:
            return

        async def sequence() -> None:
            ended = await terminate_processes(
                run.spec.agent_id, run.launched, grace_seconds, run.spec.cgroups)
            run.escalated, run.cleared = ended.escalated, ended.cleared

        run.terminator = asyncio.create_task(sequence())

    def _sweep(self, agent_id: str, launched: Launched, cgroups: AgentCgroups | None) -> None:
        for proc in members(agent_id, launched, cgroups):
            procfs.signal_process(proc, signal.SIGKILL)

    def detach(self) -> None:
        """Stop watching (daemon shutdown); the agents keep running."""
        for run in self._running.values():
            if run.watcher is not None:
                run.watcher.cancel()
        self._running.clear()


WATCHDOG_SECONDS = 0.25


def _watched(limits: Limits) -> bool:
    return bool(limits.memory_mb or limits.cpu_seconds or limits.processes or limits.log_mb)


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


def launch_argv(spec: LaunchSpec) -> list[str]:
    """The agent's argv, behind the launcher when cgroups or rlimits must be set first."""
    limits, groups = spec.limits, spec.cgroups
    if not (limits.open_files or limits.cpu_seconds or (groups and groups.dirs)):
        return spec.argv
    return launcher_argv(cgroups=[str(d) for d in (groups.dirs.values() if groups else ())],
                         open_files=limits.open_files, cpu_seconds=limits.cpu_seconds,
                         argv=spec.argv)


def members(agent_id: str, launched: Launched, cgroups: AgentCgroups | None,
            newer_than: float | None = None) -> list[procfs.ProcStat]:
    """The agent's live processes: from its cgroup when it has one (exact, and one small
    read), else from a /proc pass that started at or after newer_than."""
    found = cgroups.processes() if cgroups is not None else None
    if found is not None:
        return found
    return procfs.agent_processes(launched.pid, launched.start_time, agent_id, newer_than)


async def _first_gone(launched: Launched, timeout: float) -> None:
    """Wait, up to timeout, for the agent's first process to end."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(procfs.wait_exit(launched.pid, launched.start_time),
                               timeout=timeout)


@dataclass(frozen=True)
class Terminated:
    escalated: bool  # SIGKILL was needed
    cleared: bool  # the last look found none of the agent's processes alive


async def terminate_processes(agent_id: str, launched: Launched, grace_seconds: float,
                              cgroups: AgentCgroups | None = None) -> Terminated:
    """SIGTERM every process of the agent, wait up to grace, then SIGKILL until none is
    left."""

    def scan() -> list[procfs.ProcStat]:
        """The agent's processes, seen after this call (a /proc pass is shared with
        other kills asking at the same time)."""
        return members(agent_id, launched, cgroups, time.monotonic())

    deadline = time.monotonic() + grace_seconds
    if procfs.signal_group(launched.pid, launched.start_time, signal.SIGTERM):
        # The first process lives, and its process group (the agent's own session) has
        # SIGTERM: most agents end with that process, so wait for it (its pidfd says
        # when) and then look for what is left, rather than pass over /proc first.
        await _first_gone(launched, grace_seconds)
        procs = await asyncio.to_thread(scan)
        for proc in procs:
            if proc.pgrp != launched.pid:
                # It left the group (setsid) before the signal: its SIGTERM is now.
                procfs.signal_process(proc, signal.SIGTERM)
    else:
        # The first process is gone (or the kernel cannot signal a group by pidfd):
        # find every process of the agent and signal each.
        procs = await asyncio.to_thread(scan)
        for proc in procs:
            procfs.signal_process(proc, signal.SIGTERM)
        if any(p.pid == launched.pid and p.start_time == launched.start_time for p in procs):
            await _first_gone(launched, grace_seconds)
            procs = await asyncio.to_thread(scan)
    pause = FIRST_POLL_SECONDS  # what is left may stop soon: look again soon, then less often
    while procs and time.monotonic() < deadline:
        await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, POLL_SECONDS)
        procs = await asyncio.to_thread(scan)
    if not procs:
        return Terminated(escalated=False, cleared=True)
    sweep_until = time.monotonic() + KILL_SWEEP_SECONDS
    while procs and time.monotonic() < sweep_until:
        for proc in procs:
            procfs.signal_process(proc, signal.SIGKILL)
        await asyncio.sleep(POLL_SECONDS / 5)
        procs = await asyncio.to_thread(scan)
    if procs:
        log.error("agent %s: processes %s survived SIGKILL", agent_id,
                  [p.pid for p in procs])
    return Terminated(escalated=True, cleared=not procs)
