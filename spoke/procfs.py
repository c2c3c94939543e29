"""Reading /proc: process identity (pid + start time) and an agent's process set.

A pid alone is not an identity: pids are recycled. Every signal goes through a pidfd
opened after the start time was checked, so it can only reach the process we meant.
"""

from __future__ import annotations

import _thread
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

PROC = Path("/proc")
AGENT_ENV = "FLEETWIRE_AGENT_ID"


class ProcStat(NamedTuple):
    # A tuple, not a dataclass: a kill's pass over /proc makes one per process, and a
    # frozen dataclass costs several times as much to build.
    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    # Field 22 of /proc/PID/stat: clock ticks after boot when the process started.
    start_time: int

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def _read(path: str, *, at_most: int | None = None) -> bytes:
    """A whole /proc file (or its first at_most bytes, in one read), with plain system
    calls: a fraction of what a pathlib read costs, and a kill may read every process's
    stat several times."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if at_most is not None:
            return os.read(fd, at_most)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_stat(pid: int) -> ProcStat | None:
    try:
        # A stat line is a few hundred bytes: one read returns all of it.
        raw = _read(f"/proc/{pid}/stat", at_most=4096)
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) is in parentheses and may itself hold spaces or ')'. Only the
    # fields up to the start time (22) are split off.
    rest = raw[raw.rindex(b")") + 2:].split(None, 20)
    return ProcStat(pid, rest[0].decode(errors="replace"), int(rest[1]), int(rest[2]),
                    int(rest[3]), int(rest[19]))


def start_time(pid: int) -> int | None:
    st = read_stat(pid)
    return st.start_time if st is not None and st.alive else None


def is_same_process(pid: int, recorded_start: int) -> bool:
    """True only if pid is alive and started when we recorded it did."""
    return start_time(pid) == recorded_start


# A pass over /proc that started after a caller asked is as good, for that caller, as
# one of its own: callers that wait for the same lock share the next pass. Many agents
# killed at once then cost a few passes, not one each.
# From _thread, and asyncio imported where it is used: this module runs in the spoke's
# launcher too, and threading's and asyncio's at-fork hooks would make every one of its
# forks several times slower.
_pass_lock = _thread.allocate_lock()
_snapshot: tuple[float, list[ProcStat]] = (-1.0, [])


def _all_stats(newer_than: float | None = None) -> list[ProcStat]:
    """Live processes, from a pass that started at or after newer_than (default: now)."""
    global _snapshot
    wanted = time.monotonic() if newer_than is None else newer_than
    with _pass_lock:
        taken, stats = _snapshot
        if taken >= wanted:
            return stats
        started = time.monotonic()
        stats = []
        for name in os.listdir(PROC):
            if name.isdigit():
                st = read_stat(int(name))
                if st is not None and st.alive:
                    stats.append(st)
        _snapshot = (started, stats)
        return stats


# A process's initial environment never changes, so which agent (if any) a process
# belongs to is read once per (pid, start time): many concurrent kills then cost a pass
# over /proc/*/stat each, not over every process's environment.
_AGENT_OF: dict[tuple[int, int], str] = {}
_AGENT_OF_LIMIT = 100_000


def _agent_of(proc: ProcStat) -> str:
    key = (proc.pid, proc.start_time)
    found = _AGENT_OF.get(key)
    if found is None:
        found = ""
        try:
            environ = _read(f"/proc/{proc.pid}/environ")
        except OSError:
            return ""  # not cached: may be readable later
        prefix = AGENT_ENV.encode() + b"="
        for item in environ.split(b"\0"):
            if item.startswith(prefix):
                found = item[len(prefix):].decode(errors="replace")
                break
        if len(_AGENT_OF) >= _AGENT_OF_LIMIT:
            _AGENT_OF.clear()
        _AGENT_OF[key] = found
    return found


def agent_processes(root_pid: int, root_start: int, agent_id: str,
                    newer_than: float | None = None) -> list[ProcStat]:
    """Every live process of an agent: its session and process group, the descendants
    of any of them, and any process carrying the agent's environment marker (which
    finds descendants that escaped with setsid and were re-parented)."""
    stats = _all_stats(newer_than)
    me = os.getpid()
    # A pgrp/session id stays allocated while any member lives, so membership by these
    # ids cannot hit an unrelated process even after the root's pid was recycled. Ids 0
    # and 1 are never an agent's: 0 is what /proc shows for a session led outside this
    # pid namespace, so matching it would take in unrelated processes.
    by_group = root_pid > 1
    members = {s.pid: s for s in stats
               if by_group and s.pid != me and root_pid in (s.pgrp, s.session)}
    root = next((s for s in stats if s.pid == root_pid), None)
    if by_group and root is not None and root.start_time == root_start:
        members[root_pid] = root
    for s in stats:
        # ppid 2 is kthreadd: kernel threads have no environment to read.
        candidate = s.pid not in members and s.pid not in (me, 1) and s.ppid != 2
        if candidate and _agent_of(s) == agent_id:
            members[s.pid] = s
    by_parent: dict[int, list[ProcStat]] = {}
    for s in stats:
        by_parent.setdefault(s.ppid, []).append(s)
    frontier = list(members)
    while frontier:
        for child in by_parent.get(frontier.pop(), ()):
            if child.pid not in members and child.pid != me:
                members[child.pid] = child
                frontier.append(child.pid)
    return list(members.values())


NO_PIDFD_POLL_SECONDS = 0.05


def _is_running(pid: int, recorded_start: int | None) -> bool:
    started = start_time(pid)
    return started is not None and recorded_start in (None, started)


async def wait_exit(pid: int, recorded_start: int | None) -> None:
    """Wait until this process (pid and start time) has exited; works for non-children,
    since a pidfd becomes readable when its process ends. recorded_start None: pid is
    a child of this process not yet reaped, which no other process can have."""
    import asyncio

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except OSError:
        # No pidfd to be had (out of open files): look again every so often instead.
        while _is_running(pid, recorded_start):  # noqa: ASYNC110 (nothing to wait on)
            await asyncio.sleep(NO_PIDFD_POLL_SECONDS)
        return
    try:
        if not _is_running(pid, recorded_start):
            return
        loop = asyncio.get_running_loop()
        gone: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await gone
        finally:
            loop.remove_reader(fd)
    finally:
        os.close(fd)


def signal_pid(pid: int, recorded_start: int, sig: signal.Signals) -> bool:
    """Send sig to exactly this process (pid and start time), via a pidfd; False if it
    is gone (or the pid is someone else's now)."""
    return _send(pid, recorded_start, sig, 0)


def signal_process(proc: ProcStat, sig: signal.Signals) -> bool:
    """Send sig to exactly this process (pid and start time), via a pidfd; False if it
    is gone (or the pid is someone else's now)."""
    return _send(proc.pid, proc.start_time, sig, 0)


def _send(pid: int, recorded_start: int, sig: signal.Signals, flags: int) -> bool:
    """pidfd_send_signal to pid, once its pidfd is open and its start time checked: the
    pidfd holds the process, so the signal reaches the one whose start was checked."""
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        return False
    try:
        if start_time(pid) != recorded_start:
            return False  # the pid now belongs to someone else
        signal.pidfd_send_signal(fd, sig, None, flags)
        return True
    except OSError:
        return False  # ESRCH: it ended just now; EINVAL: flags this kernel lacks
    finally:
        os.close(fd)



def _task_children(pid: int) -> list[int]:
    """The children of every thread of pid, from /proc/PID/task/TID/children."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            found += [int(c) for c in _read(f"/proc/{pid}/task/{tid}/children").split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of pid. For a child subreaper (an agent's supervisor) this
    is everything its agent started, setsid or not. Children are read from
    /proc/PID/task/TID/children where the kernel has it (CONFIG_PROC_CHILDREN), else
    from one pass over /proc."""
    children: Callable[[int], list[int]] = _task_children
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):
        by_parent: dict[int, list[int]] = {}
        for s in _all_stats():
            by_parent.setdefault(s.ppid, []).append(s.pid)
        children = lambda parent: by_parent.get(parent, [])  # noqa: E731
    found: list[int] = []
    frontier = [pid]
    while frontier:
        for child in children(frontier.pop()):
            if child not in found:
                found.append(child)
                frontier.append(child)
    return found
