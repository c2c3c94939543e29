"""The per-agent supervisor: one small process for each agent, which outlives the spoke.

The spoke's launcher (spoke/zygote.py) forks it. It runs as the spoke's user, in the
host's namespaces, in a session of its own, and is the reaper of everything below it:

    supervisor ── init (PID 1 of the agent's PID namespace; its mount, IPC and, with
                  │     network = "none", network namespaces; reaps, passes SIGTERM on)
                  └── agent (its own uid in "full"; no_new_privs; the template's argv)

With isolation "none" the agent is the supervisor's child directly. The supervisor:
- holds the read end of the agent's stdout and stderr and writes the log under its cap;
- ends the agent at max_runtime_seconds, and carries out the kills the spoke asks for
  (kill.json, then SIGTERM to the supervisor): SIGTERM into the agent, then after the
  grace period SIGKILL to the init, which ends the whole PID namespace, and cgroup.kill;
- when the agent's first process ends, ends what it left behind (the init exits and the
  kernel kills the rest of the namespace), unless the template keeps it;
- records how the agent ended in exit.json, which the spoke (or a restarted spoke)
  collects, and only then exits.

Its run folder, <home>/run/<agent_id>/ (the spoke's alone, hidden from every agent):
    supervisor.json  written before the agent starts: the supervisor and its agent
    kill.json        written by the spoke to ask for a kill
    exit.json        written once nothing of the agent is left
    supervisor.log   the supervisor's own errors, if it had any

Init and supervisor talk over a pipe, one line per event: "R" (the agent started), "F
message" (it could not: nothing of it runs) and "X status" (its first process ended,
with the wait status).

Supervisors are made ahead of need. The launcher keeps a few forked and waiting, each
with its init already in a PID namespace, in cgroups of its own and in the spoke's view
of the files (`SpokeSide`): the costly part of a start (two forks, the moves into
cgroups, a few dozen mounts) is done before the spawn arrives. A spawn then hands one of
them its plan (`ShimPlan`), over a socket the launcher holds; the init adds the agent's
own working folder and network, takes the agent's identity and starts it. An idle
supervisor whose launcher goes away ends, with its init.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import selectors
import signal
import socket
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NoReturn

from spoke import procfs, sandbox
from spoke.limits import CgroupPlan
from spoke.logs import LogWriter

SUPERVISOR_FILE = "supervisor.json"
KILL_FILE = "kill.json"
EXIT_FILE = "exit.json"
ERRORS_FILE = "supervisor.log"
# After the agent's tree is gone, how long output still in the pipe is waited for.
DRAIN_SECONDS = 2.0
# How long the supervisor tries to remove the agent's cgroups once it is gone.
CGROUP_REMOVE_SECONDS = 5.0
# How often, after SIGKILL, what is left is looked for again (isolation "none").
SWEEP_SECONDS = 0.02
# The largest plan (argv, environment, record).
MAX_PLAN = 1 << 20
# Ignored by the supervisor (and, from Python's start, its launcher): an agent must
# start with them at their defaults, as exec keeps what is ignored ignored.
_IGNORED_BY_SUPERVISORS = (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ)
_RESET_SIGNALS = tuple(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
_INIT_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                 signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}


@dataclass(frozen=True)
class SpokeSide:
    """What every agent of a spoke has alike: sent once to the launcher, which makes its
    waiting supervisors with it."""

    level: str
    view: sandbox.View
    # Where the agents' cgroups go, by controller ("v2" for the v2 hierarchy).
    cgroup_bases: dict[str, str] = field(default_factory=dict)
    # How many supervisors wait, made ahead of need.
    warm: int = 2
    # Where the supervisors' run folders go ("" for nowhere to warm up in).
    run_root: str = ""

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> SpokeSide:
        raw = json.loads(data)
        raw["view"] = sandbox.View(**{**raw["view"], "expose": tuple(raw["view"]["expose"])})
        return cls(**raw)


@dataclass(frozen=True)
class ShimPlan:
    """Everything the supervisor needs to start and watch one agent (sent as JSON)."""

    agent_id: str
    argv: list[str]
    env: dict[str, str]
    # The agent's working folder, inside the spoke's home.
    workdir: str
    log_path: str
    log_cap_bytes: int
    run_dir: str
    max_runtime_seconds: float
    grace_seconds: float
    # False: a network namespace of its own with only a loopback interface.
    network: bool = True
    uid: int = -1
    gid: int = -1
    # Limits written into the agent's cgroups: (controller, file, value).
    cgroup_settings: tuple[tuple[str, str, str], ...] = ()
    open_files: int = 0
    cpu_seconds: int = 0
    keep_descendants: bool = False
    # Its effective limits, for the record of how it ended (by name, as in Limits).
    limits: dict[str, int] = field(default_factory=dict)
    # The agent's record (tenant, workspace, template...), kept in supervisor.json so a
    # spoke that lost its database can rebuild it.
    record: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        # Not asdict(): it deep-copies every value first, and this is on every spawn.
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShimPlan:
        raw = json.loads(data)
        raw["cgroup_settings"] = tuple(tuple(x) for x in raw["cgroup_settings"])
        return cls(**raw)


# A plan of the usual size, for warming up (see _warm_up).
_SAMPLE = ShimPlan(agent_id="0" * 32, argv=["/bin/true"] * 8, env={"PATH": "/bin"} | {
    f"X{n}": "x" * 40 for n in range(8)}, workdir="/", log_path="/dev/null",
    log_cap_bytes=1, run_dir="/", max_runtime_seconds=1, grace_seconds=1,
    cgroup_settings=(("v2", "x", "1"),), limits={"memory_mb": 0},
    record={f"k{n}": "v" * 20 for n in range(16)})


def _warm_up(scratch: Path | None) -> None:
    """Run once, while waiting, what a start runs, so the pages it writes (a fork shares
    every page until written) are this process's own before a spawn waits on it."""
    ShimPlan.from_json(_SAMPLE.to_json())
    procfs.start_time(os.getpid())
    if scratch is not None:
        write_json(scratch, {"warm": asdict(_SAMPLE)})
        read_json(scratch)
        scratch.unlink()
    selectors.DefaultSelector().close()


def write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace path with value atomically: a reader sees all of it or none. Not synced to
    disk: what reads it after a crash of the spoke or the supervisor is the page cache,
    and a crash of the machine takes every agent with it."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(value).encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class _SetupFailed(Exception):
    """The agent could not be started; nothing of it runs."""


def serve(side: SpokeSide, sock: socket.socket) -> NoReturn:
    """A supervisor's whole life, in the process the launcher forked for it: get ready,
    wait for a plan on sock, then start and watch that agent. It never returns."""
    code = 0
    supervisor = _Supervisor(side)
    try:
        try:
            supervisor.prepare(sock.fileno())
            unprepared = ""
        except OSError as exc:
            # Said to the spawn that comes for it, rather than dying unheard.
            unprepared = f"cannot prepare the agent's supervisor: {exc}"
        message, fds, _, _ = socket.recv_fds(sock, MAX_PLAN, 3)
        sock.close()
        if not message:
            supervisor.stand_down()  # the launcher went away: no agent for this one
        elif unprepared:
            os.write(fds[0], json.dumps({"ok": False, "error": unprepared}).encode())
            supervisor.stand_down()
        else:
            supervisor.run(ShimPlan.from_json(message), ready_fd=fds[0], fence_fd=fds[-1],
                           claim_fd=fds[1] if len(fds) == 3 else None)
    except BaseException as exc:  # the last word of the process
        with contextlib.suppress(Exception):
            os.write(2, f"supervisor {os.getpid()} failed: {exc!r}\n".encode())
        code = 1
    os._exit(code)


class _Supervisor:
    def __init__(self, side: SpokeSide) -> None:
        self.side = side
        self.isolated = side.level != sandbox.NONE
        self.plan: ShimPlan | None = None
        self.run_dir = Path()
        self._ready_fd: int | None = None
        self._claim_fd: int | None = None
        # Its own cgroups, made when it gets ready; the agent's limits go in them.
        self.cgroups = CgroupPlan()
        self.child = 0  # the init, or the agent itself with isolation "none"
        self.child_status: int | None = None
        self.agent_status: int | None = None
        self.error = ""
        self.kill: dict[str, Any] | None = None
        self.timed_out = False
        self.escalated = False
        self.grace_deadline: float | None = None
        self.runtime_deadline = 0.0
        self._signals: set[int] = set()
        self._log: LogWriter | None = None
        self._wake = -1
        # To the init: the go (the plan), and the lifeline whose end it watches.
        self._go = -1
        self._lifeline = -1
        self._log_r = -1
        self._status_r = -1
        # Status lines read along with the first one (a quick agent's end).
        self._early = b""

    def prepare(self, keep: int) -> None:
        """Everything that does not depend on the agent: session, signals, cgroups and,
        when isolated, the init in its namespaces and view, waiting for the plan."""
        _keep_only({keep})
        os.setsid()
        sandbox.reap_orphans()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        self._wake = wake_r
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, lambda signo, _frame: self._signals.add(signo))
        for sig in _IGNORED_BY_SUPERVISORS:
            signal.signal(sig, signal.SIG_IGN)
        self.cgroups = CgroupPlan(dirs={c: f"{base}/w{os.getpid()}"
                                        for c, base in self.side.cgroup_bases.items()})
        self.cgroups.create()
        _warm_up(Path(self.side.run_root) / f".warm-{os.getpid()}"
                 if self.side.run_root else None)
        if not self.isolated:
            return
        joins = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in self.cgroups.join_files()]
        self._log_r, log_w = os.pipe2(os.O_CLOEXEC)
        self._status_r, status_w = os.pipe2(os.O_CLOEXEC)
        go_r, self._go = os.pipe2(os.O_CLOEXEC)
        lifeline_r, self._lifeline = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(lifeline_r, False)
        if self.side.level == sandbox.NAMESPACES:
            sandbox.enter_user_namespace(os.getuid(), os.getgid())
        sandbox.unshare(sandbox.CLONE_NEWPID)
        self.child = os.fork()
        if self.child == 0:
            _child(lambda: _init(self.side.view, log_w, status_w, go_r, joins, lifeline_r))
        for fd in (log_w, status_w, go_r, lifeline_r, *joins):
            os.close(fd)

    def stand_down(self) -> None:
        """No agent came: end the waiting init and take the cgroups away."""
        if self.child:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child, signal.SIGKILL)
            self._wait_child()
        self._remove_cgroups()

    def run(self, plan: ShimPlan, *, ready_fd: int, fence_fd: int,
            claim_fd: int | None) -> None:
        self.plan = plan
        self.run_dir = Path(plan.run_dir)
        self._ready_fd, self._claim_fd = ready_fd, claim_fd
        self.runtime_deadline = time.monotonic() + plan.max_runtime_seconds
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        errors = os.open(self.run_dir / ERRORS_FILE,
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.dup2(errors, 2)
        os.close(errors)
        try:
            self._start(plan, fence_fd)
        except _SetupFailed as exc:
            self.error = str(exc)
            self._tell_spoke({"ok": False, "error": self.error})
            self._finish()
            return
        self._tell_spoke({"ok": True, "pid": os.getpid(),
                          "start_time": procfs.start_time(os.getpid()),
                          "cgroups": self.cgroups.dirs})
        self._loop()
        self._finish()

    def _tell_spoke(self, message: dict[str, Any]) -> None:
        if self._ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._ready_fd, json.dumps(message).encode())
        os.close(self._ready_fd)
        self._ready_fd = None

    def _start(self, plan: ShimPlan, fence_fd: int) -> None:
        """Prepare the agent's folder and limits, have it started, and meanwhile write
        the record a restarted spoke finds it by and open its log."""
        try:
            workdir = Path(plan.workdir)
            workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Mode first: once chowned, changing it would take CAP_FOWNER.
            os.chmod(workdir, 0o700)
            if self.side.level == sandbox.FULL:
                os.chown(workdir, plan.uid, plan.gid)
            self.cgroups.write(plan.cgroup_settings)
        except OSError as exc:
            os.close(fence_fd)
            raise _SetupFailed(f"cannot prepare the agent: {exc}") from None
        if self.isolated:
            try:
                os.write(self._go, plan.to_json())
                os.close(self._go)
            except OSError:
                pass  # the init is gone; its status pipe says so
        # While the init starts the agent. The fence is held until the record is written:
        # a spoke restarting meanwhile waits for it (spoke/launcher.py).
        write_json(self.run_dir / SUPERVISOR_FILE, {
            "agent_id": plan.agent_id, "pid": os.getpid(),
            "start_time": procfs.start_time(os.getpid()), "level": self.side.level,
            "uid": plan.uid, "cgroups": {"dirs": self.cgroups.dirs},
            "grace_seconds": plan.grace_seconds, "limits": plan.limits,
            "record": plan.record})
        os.close(fence_fd)
        try:
            Path(plan.log_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._log = LogWriter(Path(plan.log_path), plan.log_cap_bytes)
        except OSError as exc:
            # The agent's output waits in its pipe; it is not started without a log.
            if self.isolated:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.child, signal.SIGKILL)
                self._wait_child()
            raise _SetupFailed(f"cannot open the agent's log: {exc}") from None
        if not self.isolated:
            self._fork_agent(plan)
        self._await_start()

    def _fork_agent(self, plan: ShimPlan) -> None:
        """Isolation "none": the agent is this process's child, in the agent's cgroups
        (which this process stays out of)."""
        try:
            joins = [os.open(p, os.O_WRONLY | os.O_CLOEXEC)
                     for p in self.cgroups.join_files()]
            self._log_r, log_w = os.pipe2(os.O_CLOEXEC)
            self._status_r, status_w = os.pipe2(os.O_CLOEXEC)
            self.child = os.fork()
        except OSError as exc:
            raise _SetupFailed(f"cannot start the agent: {exc}") from None
        if self.child == 0:
            _child(lambda: _exec_agent(plan, log_w, status_w, joins))
        for fd in (log_w, status_w, *joins):
            os.close(fd)

    def _await_start(self) -> None:
        """Wait for the first line: the agent started, or could not."""
        line, self._early = _read_line(self._status_r)
        # Isolated, the init says R or F; else the agent's own pipe closes on exec, or
        # carries why it could not.
        if line.startswith("R") if self.isolated else not line:
            return
        message = line.removeprefix("F ") or "the agent's sandbox ended before the agent started"
        self._wait_child()
        raise _SetupFailed(message)

    def _wait_child(self) -> None:
        with contextlib.suppress(ChildProcessError):
            _, self.child_status = os.waitpid(self.child, 0)

    def _loop(self) -> None:
        log_r, status_r, wake_r = self._log_r, self._status_r, self._wake
        selector = selectors.DefaultSelector()
        for fd in (log_r, status_r, wake_r):
            selector.register(fd, selectors.EVENT_READ)
        open_fds = {log_r, status_r}
        buffered = b""
        if self._early:
            *lines, buffered = self._early.split(b"\n")
            for line in lines:
                self._on_status(line.decode(errors="replace"))
        gone_at: float | None = None
        while True:
            timeout = self._next_timeout(gone_at)
            for key, _ in selector.select(timeout):
                fd = int(key.fd)
                if fd == wake_r:
                    with contextlib.suppress(BlockingIOError):
                        os.read(wake_r, 512)
                    continue
                chunk = os.read(fd, 65536)
                if not chunk:
                    selector.unregister(fd)
                    os.close(fd)
                    open_fds.discard(fd)
                elif fd == log_r:
                    self._write_log(chunk)
                else:
                    buffered += chunk
                    *lines, buffered = buffered.split(b"\n")
                    for line in lines:
                        self._on_status(line.decode(errors="replace"))
            self._on_signals()
            self._on_deadlines()
            if self._tree_gone():
                gone_at = gone_at or time.monotonic()
                if not open_fds or time.monotonic() - gone_at > DRAIN_SECONDS:
                    break
        for fd in open_fds:
            os.close(fd)

    def _next_timeout(self, gone_at: float | None) -> float | None:
        now = time.monotonic()
        deadlines = [self.grace_deadline if self.grace_deadline is not None
                     else self.runtime_deadline]
        if gone_at is not None:
            deadlines.append(gone_at + DRAIN_SECONDS)
        if self.escalated and not self.isolated and not self._tree_gone():
            deadlines.append(now + SWEEP_SECONDS)
        return max(0.0, min(deadlines) - now)

    def _write_log(self, chunk: bytes) -> None:
        assert self._log is not None
        try:
            self._log.write(chunk)
        except OSError as exc:
            # A full disk must not stop the agent: its output is dropped meanwhile.
            os.write(2, f"log write failed: {exc}\n".encode())

    def _on_status(self, line: str) -> None:
        if line.startswith("X "):
            self.agent_status = int(line[2:])

    def _on_signals(self) -> None:
        pending, self._signals = self._signals, set()
        if signal.SIGCHLD in pending:
            self._reap()
        if signal.SIGTERM in pending:
            asked = read_json(self.run_dir / KILL_FILE) or {
                "state": "KILLED", "reason": "its supervisor was sent SIGTERM"}
            if self.kill is None:
                self.kill = asked
            assert self.plan is not None
            grace = float(asked.get("grace_seconds", self.plan.grace_seconds))
            self._terminate(grace)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.child:
                self.child_status = status
                if not self.isolated:
                    self.agent_status = status
                    if self.plan is not None and not self.plan.keep_descendants:
                        # What the agent left behind goes with it, as with a kill.
                        self._kill_descendants()

    def _kill_descendants(self) -> None:
        for pid in procfs.descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def _terminate(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        if self.grace_deadline is not None:
            self.grace_deadline = min(self.grace_deadline, deadline)
            return
        self.grace_deadline = deadline
        if self.isolated:
            if self.child_status is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.child, signal.SIGTERM)
            return
        if self.child_status is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.child, signal.SIGTERM)
        for pid in procfs.descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def _on_deadlines(self) -> None:
        now = time.monotonic()
        assert self.plan is not None
        if self.grace_deadline is None and now >= self.runtime_deadline:
            self.timed_out = True
            self._terminate(self.plan.grace_seconds)
        if self.grace_deadline is not None and now >= self.grace_deadline \
                and not self._tree_gone():
            self.escalated = True
            self.cgroups.kill()
            if self.isolated:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.child, signal.SIGKILL)
            else:
                self._kill_descendants()

    def _tree_gone(self) -> bool:
        if self.child_status is None:
            return False
        return self.isolated or not procfs.descendants(os.getpid())

    def _finish(self) -> None:
        """Record the end once nothing of the agent is left, then let go of it."""
        assert self.plan is not None
        if self.isolated and self.child_status is not None and self.agent_status is None:
            # The init was killed before the agent's end was passed on: the namespace
            # went with it, the agent by SIGKILL.
            self.agent_status = signal.SIGKILL if self.escalated or self.kill else None
        memory_hit = self.cgroups.memory_limit_hit()
        self._remove_cgroups()
        if self._log is not None:
            self._log.close()
        if self._claim_fd is not None:
            release_claim(self._claim_fd)
        write_json(self.run_dir / EXIT_FILE, {
            "status": self.agent_status, "error": self.error, "timed_out": self.timed_out,
            "escalated": self.escalated, "kill": self.kill,
            "memory_limit_hit": memory_hit, "limits": self.plan.limits,
            "max_runtime_seconds": self.plan.max_runtime_seconds,
            "ended_at_ms": int(time.time() * 1000)})

    def _remove_cgroups(self) -> None:
        give_up = time.monotonic() + CGROUP_REMOVE_SECONDS
        while not self.cgroups.remove() and time.monotonic() < give_up:
            time.sleep(0.01)


def release_claim(fd: int) -> None:
    """Give back a uid claimed with spoke.isolation.UidPool (its lock file's fd): the file
    goes first, then the lock (see UidPool.claim)."""
    with contextlib.suppress(OSError):
        os.unlink(os.readlink(f"/proc/self/fd/{fd}"))
    os.close(fd)


def _read_line(fd: int) -> tuple[str, bytes]:
    """The first line on a pipe (blocking), and what was read after it."""
    data = b""
    while b"\n" not in data:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    line, _, rest = data.partition(b"\n")
    return line.decode(errors="replace").strip(), rest


def _keep_only(fds: set[int]) -> None:
    """Close every inherited descriptor above stderr but these (a child must not keep
    the spoke's start pipe, the uid claim or the fence open)."""
    low = 3
    for fd in sorted(fds):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, 1 << 16)


def _child(body: Any) -> NoReturn:
    """Run body in a just-forked child and never return into the parent's code."""
    try:
        body()
    finally:
        os._exit(127)


def _init(view: sandbox.View, log_w: int, status_w: int, go_r: int, joins: list[int],
          lifeline_r: int) -> NoReturn:
    """PID 1 of the agent's PID namespace: gets the view ready, waits for the plan, then
    adds the agent's folder, takes on its identity and limits, starts it, and from then
    on reaps and passes signals on."""
    _keep_only({log_w, status_w, go_r, lifeline_r, *joins})
    try:
        _stay_with_supervisor(lifeline_r)
        for fd in joins:
            os.write(fd, b"0")
            os.close(fd)
        sandbox.unshare(sandbox.CLONE_NEWNS | sandbox.CLONE_NEWIPC)
        # The folders the view makes must be traversable whatever the spoke's umask (it
        # is 077); the agent starts with the usual 022 for its own files.
        os.umask(0o022)
        built = sandbox.build_view(view)
        _warm_up(None)
    except OSError as exc:
        _fail(status_w, f"cannot set up the agent's sandbox: {exc}")
    plan_json = _read_all(go_r)
    if not plan_json:
        os._exit(0)  # its supervisor stood down
    plan = ShimPlan.from_json(plan_json)
    try:
        if not plan.network:
            sandbox.unshare(sandbox.CLONE_NEWNET)
            sandbox.loopback_up()
        sandbox.add_workdir(built, plan.workdir)
        _set_rlimits(plan)
        if plan.uid >= 0:
            # The init becomes what the agent is (no root left in the namespace for the
            # agent to reach): the kernel clears the parent-death signal on that change.
            sandbox.become(plan.uid, plan.gid)
            _stay_with_supervisor(lifeline_r)
        # As the agent: its folder is its own (root would need CAP_DAC_OVERRIDE).
        os.chdir(plan.workdir)
        os.close(lifeline_r)
        sandbox.no_new_privs()
        sandbox.undumpable()
    except (OSError, ValueError) as exc:
        _fail(status_w, f"cannot set up the agent's sandbox: {exc}")
    signal.pthread_sigmask(signal.SIG_BLOCK, _INIT_SIGNALS)
    # posix_spawnp finds a bare program name on the agent's PATH, read from this
    # process's environment.
    os.environ["PATH"] = plan.env.get("PATH", os.defpath)
    try:
        # Not a fork of this interpreter: posix_spawn starts the program without copying
        # this process, and reports a failed exec as an OSError.
        agent = os.posix_spawnp(
            plan.argv[0], plan.argv, plan.env, setsid=True, setsigmask=(),
            setsigdef=_RESET_SIGNALS, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, log_w, 1), (os.POSIX_SPAWN_DUP2, log_w, 2)])
    except OSError as exc:
        _fail(status_w, _cannot_start(plan, True, exc))
    os.close(log_w)
    os.write(status_w, b"R\n")
    _reap_as_init(agent, status_w, plan.keep_descendants)


def _fail(status_w: int, message: str) -> NoReturn:
    os.write(status_w, f"F {message}\n".encode())
    os._exit(1)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks)


def _stay_with_supervisor(lifeline_r: int) -> None:
    """SIGKILL when the supervisor dies (ending the whole namespace), and exit now if it
    already has: its end of the lifeline pipe is then closed."""
    sandbox.die_with_parent(signal.SIGKILL)
    try:
        if os.read(lifeline_r, 1) == b"":
            os._exit(1)
    except BlockingIOError:
        pass


def _set_rlimits(plan: ShimPlan) -> None:
    if plan.open_files:
        resource.setrlimit(resource.RLIMIT_NOFILE, (plan.open_files, plan.open_files))
    if plan.cpu_seconds:
        # SIGXCPU at the soft limit, SIGKILL a second later: per process; the spoke's
        # watchdog and cgroup accounting cover the whole tree.
        resource.setrlimit(resource.RLIMIT_CPU, (plan.cpu_seconds, plan.cpu_seconds + 1))


def _cannot_start(plan: ShimPlan, isolated: bool, exc: OSError) -> str:
    hint = ("; agents see the host's files read-only, without /home, /root, /tmp and the "
            "spoke's home ([spoke] agent_paths adds folders)"
            if isolated and exc.errno in (errno.ENOENT, errno.EACCES) else "")
    return f"could not start {plan.argv[0]!r}: {exc.strerror}{hint}"


def _reap_as_init(agent: int, status_w: int, keep: bool) -> NoReturn:
    agent_done = False
    while True:
        info = signal.sigwaitinfo(_INIT_SIGNALS)
        if info.si_signo != signal.SIGCHLD:
            # From outside the namespace (the supervisor) only: pass it to everyone.
            if info.si_pid == 0:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(-1, info.si_signo)
            continue
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                if agent_done:
                    os._exit(0)
                break
            if pid == 0:
                break
            if pid == agent:
                agent_done = True
                os.write(status_w, f"X {status}\n".encode())
                if not keep:
                    # Leaving ends the namespace: the kernel kills what the agent left.
                    os._exit(0)


def _exec_agent(plan: ShimPlan, log_w: int, err_w: int, joins: list[int]) -> NoReturn:
    """With isolation "none": the agent's first process, forked by its supervisor (it
    must join the agent's cgroups, which the supervisor stays out of)."""
    try:
        for fd in joins:
            os.write(fd, b"0")
        os.setsid()
        os.umask(0o022)
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log_w, 1)
        os.dup2(log_w, 2)
        _set_rlimits(plan)
        sandbox.no_new_privs()
        os.chdir(plan.workdir)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        for sig in _IGNORED_BY_SUPERVISORS:
            signal.signal(sig, signal.SIG_DFL)
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 1 << 16)
    except Exception as exc:  # reported to the supervisor, then this child ends
        os.write(err_w, f"cannot prepare the agent: {exc}".encode())
        os._exit(127)
    try:
        os.execvpe(plan.argv[0], plan.argv, plan.env)
    except OSError as exc:
        os.write(err_w, _cannot_start(plan, False, exc).encode())
    os._exit(127)
