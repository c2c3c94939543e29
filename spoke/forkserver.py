"""The launcher process: forks the agents' supervisors (spoke/shim.py) for the spoke.

It imports only what a supervisor runs (no gRPC, no database), so each fork is small and
shares these pages with the launcher until it writes to them. It keeps a few
supervisors forked and waiting, each ready but for its agent, and hands each spawn's
plan to one of them, forking another to take its place. See spoke/launcher.py for why
it exists and how the spoke talks to it.
"""

from __future__ import annotations

import collections
import contextlib
import gc
import json
import os
import signal
import socket

from spoke import sandbox
from spoke.shim import MAX_PLAN, SpokeSide, serve


def main(args: list[str]) -> None:
    """The launcher process: hand each plan to a waiting supervisor until the spoke
    hangs up."""
    sock = socket.socket(fileno=int(args[0]))
    fence, agent_uid = int(args[1]), int(args[2])
    # First, what this machine lets agents have (the spoke chooses its level from it)...
    sock.send(json.dumps({level: sandbox.probe(level, agent_uid)
                          for level in (sandbox.FULL, sandbox.NAMESPACES)}).encode())
    # ... then what all its agents have alike.
    described = sock.recv(MAX_PLAN)
    if not described:
        return
    side = SpokeSide.from_json(described)
    # Supervisors are reaped by the kernel: the launcher never waits for them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    gc.freeze()  # what is loaded now stays shared with every supervisor
    waiting: collections.deque[socket.socket] = collections.deque()

    def fill() -> None:
        while len(waiting) < side.warm:
            waiting.append(_fork_supervisor(side))

    fill()
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, MAX_PLAN, 2)
        except InterruptedError:
            continue
        if not message:
            return
        supervisor = waiting.popleft() if waiting else _fork_supervisor(side)
        try:
            # The fence goes with the plan: the supervisor holds it until its record is
            # written (spoke/launcher.py).
            socket.send_fds(supervisor, [message], [*fds, fence])
        except OSError as exc:
            _refuse(fds[0], f"its supervisor could not be reached: {exc}")
        finally:
            supervisor.close()
            for fd in fds:
                os.close(fd)
        fill()


def _fork_supervisor(side: SpokeSide) -> socket.socket:
    """A new supervisor, getting ready and then waiting for a plan on the socket
    returned."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if os.fork() == 0:
        serve(side, theirs)
    theirs.close()
    return ours


def _refuse(ready_fd: int, error: str) -> None:
    with contextlib.suppress(OSError):
        os.write(ready_fd, json.dumps({"ok": False, "error": error}).encode())
