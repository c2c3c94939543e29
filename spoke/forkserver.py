"""The launcher process: forks one supervisor per agent (spoke/shim.py) for the spoke.

It imports only what a supervisor runs (no gRPC, no database), so each fork is small and
shares these pages with the launcher until it writes to them. See spoke/launcher.py for
why it exists and how the spoke talks to it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket

from spoke import sandbox
from spoke.shim import ShimPlan, supervise

# The largest launch message (a plan: argv, environment, record).
MAX_MESSAGE = 1 << 20


def main(args: list[str]) -> None:
    """The launcher process: fork a supervisor for each plan until the spoke hangs up."""
    sock = socket.socket(fileno=int(args[0]))
    fence, agent_uid = int(args[1]), int(args[2])
    # First, what this machine lets agents have (the spoke chooses its level from it).
    sock.send(json.dumps({level: sandbox.probe(level, agent_uid)
                          for level in (sandbox.FULL, sandbox.NAMESPACES)}).encode())
    # Supervisors are reaped by the kernel: the launcher never waits for them.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    gc.freeze()  # what is loaded now stays shared with every supervisor
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, 2)
        except InterruptedError:
            continue
        if not message:
            return
        try:
            plan = ShimPlan.from_json(message)
        except (ValueError, TypeError, KeyError) as exc:
            with contextlib.suppress(OSError):
                os.write(fds[0], json.dumps({"ok": False, "error": f"bad plan: {exc}"}).encode())
            plan = None
        if plan is not None and os.fork() == 0:
            sock.close()
            supervise(plan, fds[0], fds[1] if len(fds) > 1 else None, fence)
        for fd in fds:
            os.close(fd)
