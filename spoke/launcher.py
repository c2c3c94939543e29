"""The spoke's side of the launcher: a small process the spoke starts with it, which
forks one supervisor per agent (spoke/forkserver.py, spoke/shim.py), a few of them ahead
of need.

The spoke never forks itself: it runs gRPC's threads, and the child of a threaded process
can inherit a lock some other thread held. The launcher is single-threaded and has
already imported what a supervisor runs, so a supervisor costs a fork (well under a
millisecond) instead of an interpreter start (tens of them), and shares the launcher's
memory until it writes to it.

A supervisor is the launcher's child, reaped by the kernel, and outlives it: the spoke
and its launcher may stop and restart while an agent runs (one still waiting for an
agent ends with its launcher).

The spoke and the launcher talk over a SOCK_SEQPACKET pair: one message per launch, the
plan as JSON, with file descriptors alongside: the pipe on which the supervisor says
whether the agent started, and the uid claim it holds for its life.

A fence for restarts: <home>/run/launcher.lock is locked by the spoke and the launcher
for their lives, and by each supervisor from its plan until its supervisor.json is
written (the launcher sends the lock's descriptor with the plan). A spoke
takes the lock before it looks for the agents a previous run left, so no supervisor can
be starting unseen while it looks; and two spokes never share one home.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from shared.errors import Unavailable
from spoke.shim import MAX_PLAN, ShimPlan, SpokeSide

LOCK_FILE = "launcher.lock"
# How long a starting spoke waits for a previous run's launcher and supervisors to let go
# of the lock (a launcher whose spoke died notices at once; a supervisor holds it for a
# few milliseconds).
FENCE_SECONDS = 10.0
# How long a launch may take before the spoke gives up on it (the supervisor, if it
# ever starts, is then found by the next restart or its own max_runtime).
START_SECONDS = 30.0
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "from spoke.forkserver import main; main(sys.argv[2:])")


class LaunchFailed(Exception):
    """The agent could not be started; nothing of it runs. The message says why."""


@dataclass(frozen=True)
class Started:
    """A running supervisor: what the spoke records and signals (pid and start time),
    and the agent's cgroups by controller."""

    pid: int
    start_time: int
    cgroups: dict[str, str]


class Launcher:
    """The spoke's side: takes the fence, starts the launcher, asks it for agents."""

    def __init__(self, run_dir: Path, agent_uid: int) -> None:
        self.run_dir = run_dir
        # A uid agents would get, for the launcher's trial of isolation "full".
        self._agent_uid = agent_uid
        self._fence: int | None = None
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    async def fence(self) -> None:
        """Take the lock (waiting for a previous run's launcher and supervisors to let
        go); Unavailable if another spoke holds it."""
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        give_up = time.monotonic() + FENCE_SECONDS
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > give_up:
                    os.close(fd)
                    raise Unavailable(
                        f"{self.run_dir / LOCK_FILE} is held: another spoke (or its "
                        "launcher) uses this home; stop it first") from None
                await asyncio.sleep(0.05)
        self._fence = fd

    async def start(self) -> dict[str, str]:
        """Start the launcher process (after fence()); what it found this machine lets
        agents have: for each isolation level, '' or why not."""
        assert self._fence is not None, "fence() first"
        ours = self._run_launcher(self._fence)
        self._sock = ours
        loop = asyncio.get_running_loop()
        try:
            probed = await asyncio.wait_for(loop.sock_recv(ours, MAX_PLAN), START_SECONDS)
        except TimeoutError:
            probed = b""
        if not probed:
            raise Unavailable("the spoke's launcher did not start; see the spoke's log")
        found = json.loads(probed)
        return {str(k): str(v) for k, v in found.items()}

    async def configure(self, side: SpokeSide) -> None:
        """Tell the launcher what every agent of this spoke has alike (after start()):
        it then makes its waiting supervisors."""
        await self._send(side.to_json(), [])

    def _run_launcher(self, fence: int) -> socket.socket:
        """Start the launcher process; the spoke's end of the socket pair to it."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOT, json.dumps(sys.path),
                 str(theirs.fileno()), str(fence), str(self._agent_uid)],
                pass_fds=(theirs.fileno(), fence), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, close_fds=True)
        ours.setblocking(False)
        return ours

    async def launch(self, plan: ShimPlan, claim_fd: int | None = None) -> Started:
        """Have a supervisor start the agent; its pid and start time once the agent's
        program runs. Raises LaunchFailed with the reason when it could not start."""
        if self._proc is not None and self._proc.poll() is not None:
            raise LaunchFailed(f"the spoke's launcher ended (exit {self._proc.returncode}); "
                               "restart the spoke")
        assert self._sock is not None
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
        try:
            await self._send(plan.to_json(), [ready_w, *([claim_fd] if claim_fd else [])])
        finally:
            os.close(ready_w)
        try:
            answer = await asyncio.wait_for(_read_all(ready_r), START_SECONDS)
        except TimeoutError:
            raise LaunchFailed(f"its supervisor did not start within {START_SECONDS:g} s"
                               ) from None
        finally:
            os.close(ready_r)
        try:
            said = json.loads(answer)
        except ValueError:
            raise LaunchFailed("its supervisor ended before the agent started") from None
        if not said.get("ok"):
            raise LaunchFailed(str(said.get("error", "unknown error")))
        return Started(pid=int(said["pid"]), start_time=int(said["start_time"]),
                       cgroups={str(k): str(v) for k, v in said["cgroups"].items()})

    async def _send(self, message: bytes, fds: list[int]) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                if fds:
                    socket.send_fds(self._sock, [message], fds)
                else:
                    self._sock.send(message)
                return
            except BlockingIOError:
                writable = loop.create_future()
                loop.add_writer(self._sock, _settle, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(self._sock)

    async def close(self) -> None:
        """Stop the launcher (the supervisors and their agents go on) and the fence."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                await asyncio.to_thread(self._proc.wait, 5)
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
        if self._fence is not None:
            os.close(self._fence)
            self._fence = None


async def _read_all(fd: int) -> bytes:
    """Everything written to a pipe until its last writer closes it."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            readable = loop.create_future()
            loop.add_reader(fd, _settle, readable)
            try:
                await readable
            finally:
                loop.remove_reader(fd)
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _settle(waiter: asyncio.Future[None]) -> None:
    """A reader's or writer's callback: it may run again before its waiter resumes."""
    if not waiter.done():
        waiter.set_result(None)
