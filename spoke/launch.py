"""The agent launcher: joins the agent's cgroups, sets its rlimits, then execs the
template's argv. It runs as the agent's first process, so nothing runs inside the spoke
between fork and exec, and everything the agent starts inherits what was set here.

It is a POSIX shell script rather than Python: a shell starts in about a millisecond,
an interpreter in tens of them, and this sits on every spawn's path.

    /bin/sh -c LAUNCHER fleetwire-launch [--cgroup DIR]... [--nofile N] [--cpu SECONDS] \
        -- ARGV...
"""

from __future__ import annotations

SHELL = "/bin/sh"

# $$ is the shell's pid, which stays the agent's pid across the final exec. `set -e`
# makes any failed step (a cgroup that refuses the pid, a limit above the hard one) end
# the launch with the shell's message instead of starting the agent without it.
LAUNCHER = r"""set -e
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    --cgroup) echo "$$" > "$2/cgroup.procs" ;;
    --nofile) ulimit -n "$2" ;;
    --cpu) ulimit -St "$2"; ulimit -Ht "$(($2 + 1))" ;;
    *) echo "fleetwire-launch: unknown option $1" >&2; exit 127 ;;
  esac
  shift 2
done
shift
if [ "$#" -eq 0 ]; then echo "fleetwire-launch: nothing to run" >&2; exit 127; fi
if ! command -v "$1" >/dev/null 2>&1; then
  echo "fleetwire-launch: cannot start '$1': not found or not executable" >&2; exit 127
fi
exec "$@"
"""


def launcher_argv(*, cgroups: list[str], open_files: int, cpu_seconds: int,
                  argv: list[str]) -> list[str]:
    """The argv that sets these up and then execs `argv`."""
    opts: list[str] = []
    for d in cgroups:
        opts += ["--cgroup", d]
    if open_files:
        opts += ["--nofile", str(open_files)]
    if cpu_seconds:
        # SIGXCPU at the soft limit, SIGKILL a second later: per process; the spoke's
        # watchdog covers the whole tree.
        opts += ["--cpu", str(cpu_seconds)]
    return [SHELL, "-c", LAUNCHER, "fleetwire-launch", *opts, "--", *argv]
