"""Resource limits of an agent's whole process tree, and how each is enforced here.

Where the machine lets the spoke make cgroups (v1 controllers, or v2 with delegation),
memory and process count are enforced by the kernel for the whole tree and CPU time is
measured for the whole tree. Elsewhere the spoke degrades and says so: the watchdog
sums memory, CPU time and processes over the agent's processes from /proc and stops the
agent once past a limit. Open files are an rlimit of every process (what Linux offers).
Log size is enforced by the watchdog, which cuts the log without touching the agent.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from spoke import procfs

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Limits:
    """Effective limits of one agent; 0 means none."""

    memory_mb: int = 0
    cpu_seconds: int = 0
    open_files: int = 0
    processes: int = 0
    log_mb: int = 0


@dataclass(frozen=True)
class Usage:
    memory_bytes: int
    cpu_seconds: float
    processes: int


class CgroupSupport:
    """Which controllers the spoke may use here, found by trying once at start-up."""

    def __init__(self, spoke: str, enabled: bool = True) -> None:
        self.bases: dict[str, Path] = {}
        if enabled:
            self._probe(spoke)

    def _probe(self, spoke: str) -> None:
        own = _own_cgroups()
        for controller in ("memory", "pids", "cpuacct"):
            mount = CGROUP_ROOT / controller
            if not (mount / "cgroup.procs").exists():
                continue
            base = mount / own.get(controller, "").lstrip("/") / f"fleetwire-{spoke}"
            probe = base / "probe"
            try:
                probe.mkdir(parents=True, exist_ok=True)
                probe.rmdir()
            except OSError:
                continue
            self.bases[controller] = base

    def close(self) -> None:
        """Remove the spoke's own cgroup folders if no agent is left in them (a stopping
        spoke leaves running agents, and their cgroups, in place)."""
        for base in self.bases.values():
            with contextlib.suppress(OSError):
                base.rmdir()

    def describe(self) -> str:
        how = {
            "memory": "cgroup" if "memory" in self.bases else "watchdog (sum of RSS)",
            "processes": "cgroup" if "pids" in self.bases else "watchdog (count)",
            "cpu": ("cgroup accounting + rlimit" if "cpuacct" in self.bases
                    else "watchdog (sum of CPU time) + rlimit"),
        }
        return ", ".join(f"{k} by {v}" for k, v in how.items())


def _own_cgroups() -> dict[str, str]:
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(","):
                out[c] = path
    return out


class AgentCgroups:
    """The cgroups of one agent (possibly none), made before it starts."""

    def __init__(self, support: CgroupSupport, agent_id: str, limits: Limits) -> None:
        self.dirs: dict[str, Path] = {}
        for controller, base in support.bases.items():
            d = base / agent_id
            try:
                d.mkdir(parents=True, exist_ok=True)
                if controller == "memory" and limits.memory_mb:
                    (d / "memory.limit_in_bytes").write_text(str(limits.memory_mb << 20))
                if controller == "pids" and limits.processes:
                    (d / "pids.max").write_text(str(limits.processes))
            except OSError as exc:
                log.warning("cgroup %s for agent %s not usable: %s", controller, agent_id, exc)
                with contextlib.suppress(OSError):
                    d.rmdir()
                continue
            self.dirs[controller] = d

    def usage(self) -> dict[str, float]:
        """What the kernel counts for the tree: memory bytes, CPU seconds, processes."""
        out: dict[str, float] = {}
        with contextlib.suppress(OSError, ValueError):
            if "memory" in self.dirs:
                out["memory"] = int((self.dirs["memory"] / "memory.usage_in_bytes").read_text())
            if "cpuacct" in self.dirs:
                out["cpu"] = int((self.dirs["cpuacct"] / "cpuacct.usage").read_text()) / 1e9
            if "pids" in self.dirs:
                out["pids"] = int((self.dirs["pids"] / "pids.current").read_text())
        return out

    def processes(self) -> list[procfs.ProcStat] | None:
        """The agent's live processes as the kernel tracks them (everything it started
        stays in its cgroups, setsid or not); None when there is no cgroup to ask."""
        for d in self.dirs.values():
            try:
                pids = (d / "cgroup.procs").read_text().split()
            except OSError:
                continue
            stats = (procfs.read_stat(int(pid)) for pid in pids)
            return [st for st in stats if st is not None and st.alive]
        return None

    def memory_limit_hit(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            if "memory" in self.dirs:
                return int((self.dirs["memory"] / "memory.failcnt").read_text()) > 0
        return False

    def remove(self) -> None:
        for d in self.dirs.values():
            with contextlib.suppress(OSError):
                d.rmdir()


def tree_usage(procs: list[procfs.ProcStat]) -> Usage:
    """Memory (RSS) and CPU time summed over processes, from /proc."""
    rss = cpu = 0
    for p in procs:
        with contextlib.suppress(OSError, ValueError, IndexError):
            rss += int((procfs.PROC / str(p.pid) / "statm").read_text().split()[1]) * _PAGE
            fields = (procfs.PROC / str(p.pid) / "stat").read_text().rsplit(")", 1)[1].split()
            cpu += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return Usage(memory_bytes=rss, cpu_seconds=cpu / _TICKS, processes=len(procs))


LOG_CUT_MARK = b"\n[fleetwire: log cut at the size limit; later output is dropped]\n"


def cap_log(path: Path, limit_bytes: int) -> bool:
    """Keep the log at most limit_bytes plus a note; True if it was cut now. The agent
    keeps writing (O_APPEND) and loses only what lands past the cap."""
    try:
        size = path.stat().st_size
    except OSError:
        return False
    if size <= limit_bytes + len(LOG_CUT_MARK):
        return False
    with open(path, "r+b") as f:
        f.seek(limit_bytes)
        already = f.read(len(LOG_CUT_MARK)) == LOG_CUT_MARK
        f.truncate(limit_bytes + len(LOG_CUT_MARK))
        if not already:
            f.seek(limit_bytes)
            f.write(LOG_CUT_MARK)
    return not already
