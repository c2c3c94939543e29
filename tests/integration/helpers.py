"""Helpers for integration tests: waiting on conditions and reading agents' traces."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from shared.pb.v1 import wire_pb2
from spoke import procfs


def state(agent: wire_pb2.Agent) -> str:
    return wire_pb2.AgentState.Name(agent.state).removeprefix("AGENT_STATE_")


async def eventually(check: Callable[[], Awaitable[bool]] | Callable[[], bool],
                     timeout: float = 20.0, what: str = "condition") -> None:
    """Poll until check() is true; fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def read_number(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError, PermissionError):
        return None


def read_pid(agent_id: str, path: Path) -> int | None:
    """The host pid of the agent's process whose pid (as the agent sees it, in its own
    PID namespace) is in path; None until the file is there."""
    inner = read_number(path)
    if inner is None:
        return None
    for pid in processes_with_marker(agent_id):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        nspids = next((line.split()[1:] for line in status.splitlines()
                       if line.startswith("NSpid:")), [])
        if nspids and int(nspids[-1]) == inner:
            return pid
    return None


def pid_alive(pid: int) -> bool:
    st = procfs.read_stat(pid)
    return st is not None and st.alive


def processes_with_marker(agent_id: str) -> list[int]:
    marker = f"{procfs.AGENT_ENV}={agent_id}".encode()
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                env = Path(entry.path, "environ").read_bytes()
            except OSError:
                continue
            if marker in env.split(b"\0") and pid_alive(int(entry.name)):
                pids.append(int(entry.name))
    return pids
