"""The agent launcher: joins the agent's cgroups, sets its rlimits, then execs the
template's argv. It runs as the agent's first process, so nothing runs inside the spoke
between fork and exec, and everything the agent starts inherits what was set here.

    python -m spoke.launch [--cgroup DIR]... [--nofile N] [--cpu SECONDS] -- ARGV...
"""

from __future__ import annotations

import argparse
import os
import resource
import sys


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fleetwire-launch")
    parser.add_argument("--cgroup", action="append", default=[])
    parser.add_argument("--nofile", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=0)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    opts = parser.parse_args(args)
    argv = opts.argv[1:] if opts.argv[:1] == ["--"] else opts.argv
    if not argv:
        print("fleetwire-launch: nothing to run", file=sys.stderr)
        return 127
    for group in opts.cgroup:
        with open(os.path.join(group, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    if opts.nofile:
        resource.setrlimit(resource.RLIMIT_NOFILE, (opts.nofile, opts.nofile))
    if opts.cpu:
        # SIGXCPU at the soft limit, SIGKILL a second later: per process; the spoke's
        # watchdog covers the whole tree.
        resource.setrlimit(resource.RLIMIT_CPU, (opts.cpu, opts.cpu + 1))
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        print(f"fleetwire-launch: cannot start {argv[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
