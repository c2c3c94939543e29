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
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import selectors
import signal
import time
from dataclasses import asdict, dataclass, field
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
# Ignored by the supervisor (and, from Python's start, its launcher): an agent must
# start with them at their defaults, as exec keeps what is ignored ignored.
_IGNORED_BY_SUPERVISORS = (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGXFSZ)
_RESET_SIGNALS = tuple(signal.valid_signals() - {signal.SIGKILL, signal.SIGSTOP})
_INIT_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                 signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2}


@dataclass(frozen=True)
class ShimPlan:
    """Everything the supervisor needs to start and watch one agent (sent as JSON)."""

    agent_id: str
    argv: list[str]
    env: dict[str, str]
    level: str
    view: sandbox.View
    log_path: str
    log_cap_bytes: int
    run_dir: str
    max_runtime_seconds: float
    grace_seconds: float
    uid: int = -1
    gid: int = -1
    cgroups: CgroupPlan = field(default_factory=CgroupPlan)
    open_files: int = 0
    cpu_seconds: int = 0
    keep_descendants: bool = False
    # Its effective limits, for the record of how it ended (by name, as in Limits).
    limits: dict[str, int] = field(default_factory=dict)
    # The agent's record (tenant, workspace, template...), kept in supervisor.json so a
    # spoke that lost its database can rebuild it.
    record: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ShimPlan:
        raw = json.loads(data)
        raw["view"] = sandbox.View(**{**raw["view"], "expose": tuple(raw["view"]["expose"])})
        groups = raw["cgroups"]
        raw["cgroups"] = CgroupPlan(dirs=groups["dirs"],
                                    settings=tuple(tuple(s) for s in groups["settings"]))
        return cls(**raw)


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


def supervise(plan: ShimPlan, ready_fd: int, claim_fd: int | None,
              fence_fd: int | None) -> NoReturn:
    """The supervisor's whole life, in the process the launcher forked for it."""
    code = 0
    try:
        _Supervisor(plan, ready_fd, claim_fd).run(fence_fd)
    except BaseException as exc:  # the last word of the process
        with contextlib.suppress(Exception):
            os.write(2, f"supervisor of {plan.agent_id} failed: {exc!r}\n".encode())
        code = 1
    os._exit(code)


class _Supervisor:
    def __init__(self, plan: ShimPlan, ready_fd: int, claim_fd: int | None) -> None:
        self.plan = plan
        self.run_dir = Path(plan.run_dir)
        self._ready_fd: int | None = ready_fd
        self._claim_fd = claim_fd
        self.isolated = plan.level != sandbox.NONE
        self.child = 0  # the init, or the agent itself with isolation "none"
        self.child_status: int | None = None
        self.agent_status: int | None = None
        self.error = ""
        self.kill: dict[str, Any] | None = None
        self.timed_out = False
        self.escalated = False
        self.grace_deadline: float | None = None
        self.runtime_deadline = time.monotonic() + plan.max_runtime_seconds
        self._signals: set[int] = set()
        self._log: LogWriter | None = None
        self._lifeline: int | None = None
        # Status lines read along with the first one (a quick agent's end).
        self._early = b""

    def run(self, fence_fd: int | None) -> None:
        os.setsid()
        sandbox.reap_orphans()
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, lambda signo, _frame: self._signals.add(signo))
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_IGN)
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        errors = os.open(self.run_dir / ERRORS_FILE,
                         os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        os.dup2(errors, 2)
        os.close(errors)
        write_json(self.run_dir / SUPERVISOR_FILE, {
            "agent_id": self.plan.agent_id, "pid": os.getpid(),
            "start_time": procfs.start_time(os.getpid()), "level": self.plan.level,
            "uid": self.plan.uid, "cgroups": asdict(self.plan.cgroups),
            "grace_seconds": self.plan.grace_seconds, "limits": self.plan.limits,
            "record": self.plan.record})
        # From here a restarted spoke finds this agent: the launch's fence can go.
        if fence_fd is not None:
            os.close(fence_fd)
        try:
            channels = self._start()
        except _SetupFailed as exc:
            self.error = str(exc)
            self._tell_spoke({"ok": False, "error": self.error})
            self._finish()
            return
        self._tell_spoke({"ok": True, "pid": os.getpid(),
                          "start_time": procfs.start_time(os.getpid())})
        self._loop(channels, wake_r)
        self._finish()

    def _tell_spoke(self, message: dict[str, Any]) -> None:
        if self._ready_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._ready_fd, json.dumps(message).encode())
        os.close(self._ready_fd)
        self._ready_fd = None

    def _start(self) -> tuple[int, int]:
        """Prepare the folders, log and cgroups and start the agent; the read ends of
        the log pipe and the init's status pipe."""
        plan = self.plan
        try:
            workdir = Path(plan.view.workdir)
            workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Mode first: once chowned, changing it would take CAP_FOWNER.
            os.chmod(workdir, 0o700)
            if plan.level == sandbox.FULL:
                os.chown(workdir, plan.uid, plan.gid)
            Path(plan.log_path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._log = LogWriter(Path(plan.log_path), plan.log_cap_bytes)
            plan.cgroups.create()
            joins = [os.open(p, os.O_WRONLY | os.O_CLOEXEC) for p in plan.cgroups.join_files()]
        except OSError as exc:
            raise _SetupFailed(f"cannot prepare the agent: {exc}") from None
        log_r, log_w = os.pipe2(os.O_CLOEXEC)
        status_r, status_w = os.pipe2(os.O_CLOEXEC)
        try:
            if self.isolated:
                self._start_init(log_w, status_w, joins)
            else:
                self.child = os.fork()
                if self.child == 0:
                    _child(lambda: _exec_agent(plan, log_w, status_w, joins))
        except OSError as exc:
            raise _SetupFailed(f"cannot start the agent's sandbox: {exc}") from None
        finally:
            for fd in (log_w, status_w, *joins):
                os.close(fd)
        self._await_start(status_r)
        return log_r, status_r

    def _start_init(self, log_w: int, status_w: int, joins: list[int]) -> None:
        if self.plan.level == sandbox.NAMESPACES:
            sandbox.enter_user_namespace(os.getuid(), os.getgid())
        sandbox.unshare(sandbox.CLONE_NEWPID)
        lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(lifeline_r, False)
        self.child = os.fork()
        if self.child == 0:
            _child(lambda: _init(self.plan, log_w, status_w, joins, lifeline_r, lifeline_w))
        os.close(lifeline_r)
        # The write end stays open for the supervisor's life: the init sees its EOF if
        # the supervisor was gone before the init could ask for its parent-death signal.
        self._lifeline = lifeline_w

    def _await_start(self, status_r: int) -> None:
        """Wait for the first line: the agent started, or could not."""
        line, self._early = _read_line(status_r)
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

    def _loop(self, channels: tuple[int, int], wake_r: int) -> None:
        log_r, status_r = channels
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
                    if not self.plan.keep_descendants:
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
        if self.grace_deadline is None and now >= self.runtime_deadline:
            self.timed_out = True
            self._terminate(self.plan.grace_seconds)
        if self.grace_deadline is not None and now >= self.grace_deadline \
                and not self._tree_gone():
            self.escalated = True
            self.plan.cgroups.kill()
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
        if self.isolated and self.child_status is not None and self.agent_status is None:
            # The init was killed before the agent's end was passed on: the namespace
            # went with it, the agent by SIGKILL.
            self.agent_status = signal.SIGKILL if self.escalated or self.kill else None
        memory_hit = self.plan.cgroups.memory_limit_hit()
        give_up = time.monotonic() + CGROUP_REMOVE_SECONDS
        while not self.plan.cgroups.remove() and time.monotonic() < give_up:
            time.sleep(0.01)
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


def _init(plan: ShimPlan, log_w: int, status_w: int, joins: list[int], lifeline_r: int,
          lifeline_w: int) -> NoReturn:
    """PID 1 of the agent's PID namespace: builds the agent's view, takes on the agent's
    identity and limits, starts the agent, then reaps and passes signals on."""
    _keep_only({log_w, status_w, lifeline_r, *joins})
    try:
        _stay_with_supervisor(lifeline_r)
        for fd in joins:
            os.write(fd, b"0")
            os.close(fd)
        sandbox.unshare(sandbox.CLONE_NEWNS | sandbox.CLONE_NEWIPC
                        | (0 if plan.view.network else sandbox.CLONE_NEWNET))
        if not plan.view.network:
            sandbox.loopback_up()
        # The folders the view makes must be traversable whatever the spoke's umask (it
        # is 077); the agent starts with the usual 022 for its own files.
        os.umask(0o022)
        sandbox.build_view(plan.view)
        _set_rlimits(plan)
        if plan.level == sandbox.FULL:
            # The init becomes what the agent is (no root left in the namespace for the
            # agent to reach): the kernel clears the parent-death signal on that change.
            sandbox.become(plan.uid, plan.gid)
            _stay_with_supervisor(lifeline_r)
        # As the agent: its folder is its own (root would need CAP_DAC_OVERRIDE).
        os.chdir(plan.view.workdir)
        os.close(lifeline_r)
        sandbox.no_new_privs()
        sandbox.undumpable()
    except (OSError, ValueError) as exc:
        os.write(status_w, f"F cannot set up the agent's sandbox: {exc}\n".encode())
        os._exit(1)
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
        os.write(status_w, f"F {_cannot_start(plan, exc)}\n".encode())
        os._exit(1)
    os.close(log_w)
    os.write(status_w, b"R\n")
    _reap_as_init(agent, status_w, plan.keep_descendants)


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


def _cannot_start(plan: ShimPlan, exc: OSError) -> str:
    hint = ("; agents see the host's files read-only, without /home, /root, /tmp and the "
            "spoke's home ([spoke] agent_paths adds folders)"
            if plan.level != sandbox.NONE and exc.errno in (errno.ENOENT, errno.EACCES)
            else "")
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
        os.chdir(plan.view.workdir)
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
        os.write(err_w, _cannot_start(plan, exc).encode())
    os._exit(127)
