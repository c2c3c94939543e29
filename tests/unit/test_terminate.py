"""Killing an agent's processes: SIGTERM to its process group through the first
process's pidfd, then to whatever left the group, then SIGKILL for what stays."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from spoke import procfs
from spoke.supervisor import Launched, terminate_processes
from tests.integration.helpers import processes_with_marker

AGENT = "c" * 32
SLEEP = ["sleep", "30"]
# An agent's first process: it starts a second (in its process group), says that one's
# pid, and sleeps; "stubborn" ignores SIGTERM (after the start, so the second does not).
FIRST = ("import signal, subprocess, sys, time\n"
         "second = subprocess.Popen(['sleep', '30'])\n"
         "if sys.argv[1] == 'stubborn':\n"
         "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
         "print(second.pid, flush=True)\n"
         "time.sleep(30)\n")


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    # Second processes are the first's children, not ours: every one has the marker.
    for pid in processes_with_marker(AGENT):
        st = procfs.read_stat(pid)
        if st is not None:
            procfs.signal_process(st, signal.SIGKILL)


def launched(p: subprocess.Popen[bytes]) -> Launched:
    start = procfs.start_time(p.pid)
    assert start is not None
    return Launched(pid=p.pid, start_time=start)


def gone(pid: int) -> bool:
    st = procfs.read_stat(pid)
    return st is None or not st.alive


def agent(started: list[subprocess.Popen[bytes]], how: str = "polite"
          ) -> tuple[subprocess.Popen[bytes], int, subprocess.Popen[bytes]]:
    """The first process, the pid of a second in its process group, and a third that
    left for a session of its own but carries the agent's marker (as a grandchild that
    called setsid does)."""
    env = {**os.environ, procfs.AGENT_ENV: AGENT}
    first = subprocess.Popen([sys.executable, "-c", FIRST, how], start_new_session=True,
                             env=env, stdout=subprocess.PIPE)
    started.append(first)
    escaped = subprocess.Popen(SLEEP, start_new_session=True, env=env)
    started.append(escaped)
    assert first.stdout is not None
    second = int(first.stdout.readline())
    st = procfs.read_stat(second)
    assert st is not None and st.pgrp == first.pid
    return first, second, escaped


def test_the_group_is_signalled_through_the_first_process(
        started: list[subprocess.Popen[bytes]]) -> None:
    first, second, escaped = agent(started)
    outsider = subprocess.Popen(SLEEP, start_new_session=True)
    started.append(outsider)
    if not procfs.signal_group(first.pid, launched(first).start_time, signal.SIGTERM):
        pytest.skip("this kernel cannot signal a process group by pidfd (Linux < 6.9)")
    assert first.wait(timeout=10) == -signal.SIGTERM
    deadline = time.monotonic() + 10
    while not gone(second) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gone(second)
    # Only the group: the process that left it, and any other, are untouched.
    assert escaped.poll() is None and outsider.poll() is None


def test_a_group_is_never_signalled_for_another_process(
        started: list[subprocess.Popen[bytes]]) -> None:
    first, second, _ = agent(started)
    recorded = launched(first)
    # A start time that is not the recorded one: the pid belongs to someone else.
    assert not procfs.signal_group(first.pid, recorded.start_time + 1, signal.SIGTERM)
    first.kill()
    first.wait()
    # The first process is gone: nothing to signal the group through.
    assert not procfs.signal_group(first.pid, recorded.start_time, signal.SIGTERM)
    assert not gone(second)
    os.kill(second, signal.SIGKILL)


@pytest.mark.parametrize("by_group", [True, False], ids=["group", "one_by_one"])
async def test_every_process_of_the_agent_gets_sigterm(
        started: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch,
        by_group: bool) -> None:
    if not by_group:
        # As on a kernel before 6.9: each process found is signalled on its own.
        monkeypatch.setattr(procfs, "signal_group", lambda *_: False)
    first, second, escaped = agent(started)
    ended = await terminate_processes(AGENT, launched(first), grace_seconds=10)
    assert ended.cleared and not ended.escalated
    assert gone(second)
    for p in (first, escaped):
        assert p.wait(timeout=10) == -signal.SIGTERM


async def test_what_ignores_sigterm_gets_sigkill_after_the_grace(
        started: list[subprocess.Popen[bytes]]) -> None:
    first, second, escaped = agent(started, "stubborn")
    ended = await asyncio.wait_for(
        terminate_processes(AGENT, launched(first), grace_seconds=0.3), timeout=20)
    assert ended.cleared and ended.escalated
    assert first.wait(timeout=10) == -signal.SIGKILL
    assert gone(second)
    assert escaped.wait(timeout=10) == -signal.SIGTERM
