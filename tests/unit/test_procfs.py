"""procfs: process identity by pid and start time, and an agent's process set."""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import time

import pytest

from spoke import procfs


def test_start_time_identifies_a_process() -> None:
    me = procfs.read_stat(os.getpid())
    assert me is not None and me.alive and me.start_time > 0
    assert procfs.is_same_process(os.getpid(), me.start_time)
    assert not procfs.is_same_process(os.getpid(), me.start_time + 1)


def test_reserved_ids_never_match_unrelated_processes() -> None:
    """pgrp/session 0 is what /proc shows for sessions led outside this pid namespace:
    an agent record holding pid 0 or 1 must not sweep those up."""
    for root in (0, 1):
        assert procfs.agent_processes(root, 0, "f" * 32) == []


def test_agent_set_follows_session_and_marker() -> None:
    marker_env = {**os.environ, procfs.AGENT_ENV: "a" * 32}
    leader = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                              start_new_session=True)
    marked = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                              start_new_session=True, env=marker_env)
    try:
        start = procfs.start_time(leader.pid)
        assert start is not None
        found = {p.pid for p in procfs.agent_processes(leader.pid, start, "a" * 32)}
        assert {leader.pid, marked.pid} <= found
        assert os.getpid() not in found
    finally:
        for p in (leader, marked):
            p.kill()
            p.wait()


async def test_without_a_pidfd_wait_exit_looks_until_the_process_ends(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of open files, no pidfd can be opened: wait_exit must not take that for the
    process's end, but look again until it has ended."""
    def no_pidfd(pid: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    proc = subprocess.Popen(["/bin/sleep", "0.3"])  # noqa: ASYNC220 (as the spoke does)
    try:
        started = procfs.start_time(proc.pid)
        assert started is not None
        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
        began = time.monotonic()
        waiting = asyncio.ensure_future(procfs.wait_exit(proc.pid, None))
        await asyncio.sleep(0.1)
        assert not waiting.done()
        await asyncio.wait_for(waiting, 10)
        assert proc.poll() is not None  # ended (a zombie until reaped here)
        assert time.monotonic() - began >= 0.2
        # For a non-child, by its start time: a process already gone returns at once.
        await asyncio.wait_for(procfs.wait_exit(proc.pid, started), 1)
    finally:
        proc.kill()
        proc.wait()
