"""Resource limits of an agent's whole process tree, and how each is enforced here.

The spoke gives every agent cgroups where the machine lets it make them:
- cgroup v2 with its controllers delegated: memory.max, pids.max and cpu.max, enforced
  by the kernel for the whole tree;
- cgroup v1 (or a hybrid host such as this project's CI machine): the memory, pids, cpu
  and cpuacct hierarchies, the same limits by their v1 names;
- any cgroup v2 hierarchy, even one without controllers (a hybrid host's "unified"
  mount): membership that no process can leave, and cgroup.kill.

What no cgroup enforces here, the spoke's watchdog does: it sums memory, CPU time and
processes over the agent's processes and stops the agent once past a limit. Open files
and CPU time per process are rlimits. Logs are capped by the agent's supervisor, which
writes them (spoke/logs.py).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from spoke import procfs

CGROUP_ROOT = Path("/sys/fs/cgroup")
_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
# The period a CPU share is measured over (the kernel's default).
CPU_PERIOD_US = 100_000
V2 = "v2"


@dataclass(frozen=True)
class Limits:
    """Effective limits of one agent; 0 means none."""

    memory_mb: int = 0
    cpu_seconds: int = 0
    open_files: int = 0
    processes: int = 0
    log_mb: int = 0
    # Share of one CPU the tree may use (100: one core).
    cpu_percent: int = 0


@dataclass(frozen=True)
class Usage:
    memory_bytes: int
    cpu_seconds: float
    processes: int


# A limit written into an agent's cgroup: (controller, control file, value).
Setting = tuple[str, str, str]


@dataclass(frozen=True)
class CgroupPlan:
    """The cgroups of one agent, paths by controller ("v2" for the v2 hierarchy, whatever
    controllers it has): made by its supervisor before the agent is known, given the
    agent's limits when it is, removed once nothing of it is left."""

    dirs: dict[str, str] = field(default_factory=dict)

    @property
    def kill_file(self) -> str:
        """cgroup.kill of the agent's v2 cgroup ("" without one)."""
        return f"{self.dirs[V2]}/cgroup.kill" if V2 in self.dirs else ""

    def create(self) -> None:
        for d in self.dirs.values():
            os.makedirs(d, exist_ok=True)

    def write(self, settings: tuple[Setting, ...]) -> None:
        """Write the agent's limits; an OSError names what failed."""
        for controller, filename, value in settings:
            if controller in self.dirs:
                with open(f"{self.dirs[controller]}/{filename}", "w") as f:
                    f.write(value)

    def join_files(self) -> list[str]:
        return [f"{d}/cgroup.procs" for d in self.dirs.values()]

    def kill(self) -> bool:
        """SIGKILL every process in the agent's v2 cgroup; False without cgroup.kill."""
        if not self.kill_file:
            return False
        try:
            with open(self.kill_file, "w") as f:
                f.write("1")
        except OSError:
            return False
        return True

    def processes(self) -> list[procfs.ProcStat] | None:
        """The agent's live processes as the kernel tracks them; None when there is no
        cgroup to ask."""
        for d in self.dirs.values():
            try:
                pids = Path(d, "cgroup.procs").read_text().split()
            except OSError:
                continue
            stats = (procfs.read_stat(int(pid)) for pid in pids)
            return [st for st in stats if st is not None and st.alive]
        return None

    def usage(self) -> dict[str, float]:
        """What the kernel counts for the tree: memory bytes, CPU seconds, processes."""
        out: dict[str, float] = {}
        reads = (("memory", "memory", "memory.usage_in_bytes", 1.0),
                 ("memory", V2, "memory.current", 1.0),
                 ("cpu", "cpuacct", "cpuacct.usage", 1e-9),
                 ("pids", "pids", "pids.current", 1.0),
                 ("pids", V2, "pids.current", 1.0))
        for name, controller, filename, scale in reads:
            if name in out or controller not in self.dirs:
                continue
            with contextlib.suppress(OSError, ValueError):
                out[name] = int(Path(self.dirs[controller], filename).read_text()) * scale
        if "cpu" not in out and V2 in self.dirs:
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(self.dirs[V2], "cpu.stat").read_text().split()
                out["cpu"] = int(stat[stat.index("usage_usec") + 1]) / 1e6
        return out

    def memory_limit_hit(self) -> bool:
        with contextlib.suppress(OSError, ValueError):
            if "memory" in self.dirs:
                return int(Path(self.dirs["memory"], "memory.failcnt").read_text()) > 0
            if V2 in self.dirs:
                events = Path(self.dirs[V2], "memory.events").read_text().split()
                return int(events[events.index("oom_kill") + 1]) > 0
        return False

    def remove(self) -> bool:
        """Remove the folders; False while a process is still in one."""
        gone = True
        for d in self.dirs.values():
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError:
                gone = False
        return gone


class CgroupSupport:
    """Which cgroups the spoke may make here, found by trying once at start-up."""

    def __init__(self, spoke: str, enabled: bool = True) -> None:
        self.bases: dict[str, Path] = {}
        # Controllers the v2 base offers its children (a subset of memory, pids, cpu).
        self.v2_controllers: frozenset[str] = frozenset()
        if enabled:
            self._probe(spoke)

    def _probe(self, spoke: str) -> None:
        for controller, base in spoke_bases(spoke).items():
            if not _can_make(base):
                continue
            self.bases[controller] = base
            if controller != V2:
                continue
            self.v2_controllers = _delegate(base.parent, base)
            beside = base.parent.parent / base.name
            if (not self.v2_controllers and _offered(base.parent)
                    and _is_v2_cgroup(beside.parent) and _can_make(beside)):
                # The spoke's own cgroup offers controllers but holds the spoke, so v2
                # forbids enabling them below it: a leaf it was put in (systemd's
                # DelegateSubgroup=). Its agents' cgroups go beside it instead.
                with contextlib.suppress(OSError):
                    base.rmdir()
                self.bases[V2] = beside
                self.v2_controllers = _delegate(beside.parent, beside)

    def settings(self, limits: Limits) -> tuple[Setting, ...]:
        """What to write into an agent's cgroups for its limits, by where the machine
        enforces each."""
        v2 = self.v2_controllers
        out: list[Setting] = []
        if limits.memory_mb:
            if "memory" in v2:
                out += [(V2, "memory.max", str(limits.memory_mb << 20)),
                        (V2, "memory.swap.max", "0")]
            else:
                out.append(("memory", "memory.limit_in_bytes", str(limits.memory_mb << 20)))
        if limits.processes:
            out.append((V2, "pids.max", str(limits.processes)) if "pids" in v2
                       else ("pids", "pids.max", str(limits.processes)))
        if limits.cpu_percent:
            quota = limits.cpu_percent * CPU_PERIOD_US // 100
            if "cpu" in v2:
                out.append((V2, "cpu.max", f"{quota} {CPU_PERIOD_US}"))
            else:
                out += [("cpu", "cpu.cfs_period_us", str(CPU_PERIOD_US)),
                        ("cpu", "cpu.cfs_quota_us", str(quota))]
        if "memory" in v2:
            # The OOM killer takes the whole tree, not one process of it.
            out.append((V2, "memory.oom.group", "1"))
        return tuple(out)

    def enforced(self) -> dict[str, str]:
        """How each limit is enforced here, for logs, heartbeats and errors."""
        v2 = self.v2_controllers
        by_kernel = {
            "memory": "memory" in v2 or "memory" in self.bases,
            "processes": "pids" in v2 or "pids" in self.bases,
            "cpu share": "cpu" in v2 or "cpu" in self.bases,
        }
        out = {k: "cgroup" if v else "watchdog" for k, v in by_kernel.items()}
        out["cpu share"] = out["cpu share"] if by_kernel["cpu share"] else "not enforced"
        out["cpu time"] = ("cgroup accounting + rlimit"
                           if "cpuacct" in self.bases or "cpu" in v2 else "watchdog + rlimit")
        out["kill"] = "cgroup.kill" if V2 in self.bases else "process tree"
        return out

    def describe(self) -> str:
        return ", ".join(f"{k} by {v}" for k, v in self.enforced().items())

    def close(self) -> None:
        """Remove the spoke's own cgroup folders if no agent is left in them (a stopping
        spoke leaves running agents, and their cgroups, in place)."""
        for base in self.bases.values():
            with contextlib.suppress(OSError):
                base.rmdir()


def needed_controllers(limits: list[Limits]) -> set[str]:
    """The hierarchies a spoke's agents need cgroups in: the v2 one always (exact
    membership, cgroup.kill), and of the v1 ones those some template's limits use
    (each costs every start a move into it, which the kernel makes wait for RCU)."""
    needed = {V2}
    for lim in limits:
        needed |= {c for c, wanted in (("memory", lim.memory_mb), ("pids", lim.processes),
                                       ("cpuacct", lim.cpu_seconds),
                                       ("cpu", lim.cpu_percent)) if wanted}
    return needed


def spoke_bases(spoke: str) -> dict[str, Path]:
    """Where a spoke's agents' cgroups go, by controller: a folder of the spoke's own
    below the cgroup it runs in, in each hierarchy there is (made by CgroupSupport)."""
    own = _own_cgroups()
    name = f"fleetwire-{spoke}"
    bases = {}
    for controller in ("memory", "pids", "cpuacct", "cpu"):
        mount = CGROUP_ROOT / controller
        if (mount / "cgroup.procs").exists() and not _is_v2(mount):
            bases[controller] = mount / own.get(controller, "").lstrip("/") / name
    v2_mount = next((m for m in (CGROUP_ROOT, CGROUP_ROOT / "unified") if _is_v2(m)), None)
    if v2_mount is not None:
        bases[V2] = v2_mount / own.get("", "").lstrip("/") / name
    return bases


def _is_v2(mount: Path) -> bool:
    return (mount / "cgroup.controllers").exists()


def _can_make(base: Path) -> bool:
    probe = base / "probe"
    try:
        probe.mkdir(parents=True, exist_ok=True)
        probe.rmdir()
    except OSError:
        return False
    return True


def _delegate(own: Path, base: Path) -> frozenset[str]:
    """Enable memory, pids and cpu for the agents' cgroups below base, as far as the
    hierarchy offers them; the ones that could be enabled."""
    offered = _offered(own)
    enabled: set[str] = set()
    for parent in (own, base):
        for controller in sorted(offered):
            with contextlib.suppress(OSError):
                (parent / "cgroup.subtree_control").write_text(f"+{controller}")
        enabled = set(_read_words(parent / "cgroup.subtree_control")) & offered
        offered = enabled
    return frozenset(enabled)


def _offered(cgroup: Path) -> set[str]:
    return set(_read_words(cgroup / "cgroup.controllers")) & {"memory", "pids", "cpu"}


def _is_v2_cgroup(path: Path) -> bool:
    return (path / "cgroup.controllers").exists()


def _read_words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path by controller ("" for the v2 hierarchy)."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            for c in controllers.split(","):
                out[c] = path
    return out


def tree_usage(procs: list[procfs.ProcStat]) -> Usage:
    """Memory (RSS) and CPU time summed over processes, from /proc."""
    rss = cpu = 0
    for p in procs:
        with contextlib.suppress(OSError, ValueError, IndexError):
            rss += int((procfs.PROC / str(p.pid) / "statm").read_text().split()[1]) * _PAGE
            fields = (procfs.PROC / str(p.pid) / "stat").read_text().rsplit(")", 1)[1].split()
            cpu += sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime stime cutime cstime
    return Usage(memory_bytes=rss, cpu_seconds=cpu / _TICKS, processes=len(procs))
