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


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
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
