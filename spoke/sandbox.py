"""What an agent can reach: its namespaces, its view of the file system and its identity.

These functions run in the per-agent supervisor's children (spoke/shim.py), between
fork and exec, in single-threaded processes. They call the kernel through libc: Python
3.11 has no unshare() or mount(). Every failure raises OSError naming the step, so the
supervisor can tell the spoke what went wrong instead of starting the agent without it.

The view follows systemd's ProtectSystem=strict, ProtectHome=yes and PrivateTmp=yes: the
host's file system read-only; /home, /root and /run/user empty; /tmp, /var/tmp and
/dev/shm private and empty; a minimal /dev; a /proc of the agent's own PID namespace;
the spoke's home hidden; and the agent's own working folder, the only writable place
that outlives it. What the agent needs from hidden places (the interpreter a template
names with {python}, [spoke] agent_paths) is bound back read-only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath

# Isolation levels, weakest first. "full": own uid and gid, plus namespaces; "namespaces":
# PID, mount and IPC namespaces inside a user namespace, under the spoke's own uid;
# "none": a plain child process of the spoke's user.
NONE, NAMESPACES, FULL = "none", "namespaces", "full"
LEVELS = (NONE, NAMESPACES, FULL)

CLONE_NEWNS = 0x00020000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

# mount_setattr(2), Linux 5.12: one call makes a whole tree of mounts read-only. The
# number is the same on every architecture (new system calls share one table).
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1

# Hidden from every agent (ProtectHome=yes), besides the spoke's own home.
PROTECTED_HOMES = ("/home", "/root", "/run/user")
# Private and empty for every agent (PrivateTmp=yes).
PRIVATE_TMP = ("/tmp", "/var/tmp")
# Device nodes an agent gets in its /dev (bubblewrap's --dev, systemd's PrivateDevices).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def level_at_least(provided: str, wanted: str) -> bool:
    return LEVELS.index(provided) >= LEVELS.index(wanted)


@dataclass(frozen=True)
class View:
    """The file system every agent of a spoke sees (see the module's docstring); each
    agent's own working folder is added to it (add_workdir)."""

    # The spoke's home: keys, state.db, config.toml, every agent's folder and log.
    home: str
    # Host paths bound back read-only where a hidden or private place covers them.
    expose: tuple[str, ...] = ()


@dataclass(frozen=True)
class Built:
    """A view made, ready for the agent's folder."""

    home: str
    # The spoke's home as it is on the host (an O_PATH descriptor).
    home_fd: int
    # The empty tmpfs the way to the agent's folder will be made in ("" when that is a
    # private, writable one: /tmp, /var/tmp).
    holder: str


def unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int,
          data: str | None = None) -> None:
    _check(_libc.mount(source.encode() if source else None, target.encode(),
                       fstype.encode() if fstype else None, flags,
                       data.encode() if data else None), f"mount on {target}")


def _prctl(option: int, value: int, what: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), what)


def no_new_privs() -> None:
    """No execve() from here on can gain privileges (setuid bits, file capabilities)."""
    _prctl(PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")


def die_with_parent(sig: int) -> None:
    _prctl(PR_SET_PDEATHSIG, sig, "parent-death signal")


def reap_orphans() -> None:
    """Become the reaper of every orphaned descendant (a process that double-forks
    stays ours to find, signal and reap)."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1, "child subreaper")


def undumpable() -> None:
    """No ptrace, no /proc/PID/fd or environ for anyone without CAP_SYS_PTRACE."""
    _prctl(PR_SET_DUMPABLE, 0, "dumpable")


def enter_user_namespace(uid: int, gid: int) -> None:
    """A new user namespace mapping only this process's uid and gid to themselves (what
    an unprivileged process may map). Its children get capabilities there, none on the
    host; setgroups() is denied, as the kernel requires for such a mapping."""
    unshare(CLONE_NEWUSER)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)


def _read_only(path: str, *, recursive: bool, clear: bool = False) -> None:
    """Make the mount at path read-only (clear: writable again), with its submounts if
    recursive. Falls back to a remount per mount where mount_setattr() is missing."""
    attr = _MountAttr(0, MOUNT_ATTR_RDONLY, 0, 0) if clear else _MountAttr(
        MOUNT_ATTR_RDONLY, 0, 0, 0)
    result = _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(),
                           AT_RECURSIVE if recursive else 0, ctypes.byref(attr),
                           ctypes.sizeof(attr))
    if result == 0:
        return
    if ctypes.get_errno() != errno.ENOSYS:
        _check(-1, f"read-only {path}")
    for target in (_mounts_under(path) if recursive else [path]):
        # A remount must repeat the flags the mount has, or a locked one refuses.
        flags = _mount_flags(target)
        flags = flags & ~MS_RDONLY if clear else flags | MS_RDONLY
        try:
            mount(None, target, None, MS_REMOUNT | MS_BIND | flags)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EACCES) or target == path:
                raise


def _mounts_under(path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = line.split()[4].decode().replace("\\040", " ")
            if point == path or point.startswith(prefix) or path == "/":
                found.append(point)
    return found


def _mount_flags(path: str) -> int:
    st = os.statvfs(path)
    flags = 0
    for st_flag, ms_flag in ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV),
                             (os.ST_NOEXEC, MS_NOEXEC), (os.ST_RDONLY, MS_RDONLY)):
        if st.f_flag & st_flag:
            flags |= ms_flag
    return flags


def _inside(path: str, root: str) -> bool:
    return PurePosixPath(path).is_relative_to(root)


def _bind_from(fd: int, target: str, *, recursive: bool = True) -> None:
    mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | (MS_REC if recursive else 0))


def _tmpfs(target: str, mode: str) -> None:
    mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"mode={mode},size=64m"
          if target == "/dev" else f"mode={mode}")


def build_view(view: View) -> Built:
    """Turn this process's (new, unshared) mount namespace into the agents' view. Call
    in the agent's init; add_workdir then adds the agent's own folder."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    # Everything bound back is opened before anything is covered.
    hidden = [*PROTECTED_HOMES, *PRIVATE_TMP, view.home]
    exposed = [(p, os.open(p, os.O_PATH | os.O_CLOEXEC)) for p in sorted(set(view.expose))
               if any(_inside(p, h) for h in hidden) and os.path.exists(p)
               and not _inside(p, view.home)]
    home_fd = os.open(view.home, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    devices = [(d, os.open(f"/dev/{d}", os.O_PATH | os.O_CLOEXEC)) for d in DEVICES
               if os.path.exists(f"/dev/{d}")]
    for path in PROTECTED_HOMES:
        if os.path.isdir(path):
            _tmpfs(path, "0755")
    for path in PRIVATE_TMP:
        if os.path.isdir(path):
            _tmpfs(path, "1777")
    for path, fd in exposed:
        os.makedirs(path, mode=0o755, exist_ok=True)
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            _bind_from(fd, path)
        else:
            if not os.path.exists(path):
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
            _bind_from(fd, path, recursive=False)
        os.close(fd)
    # After the exposures: one of them may hold the home (the home is hidden in it too).
    if os.path.isdir(view.home):
        _tmpfs(view.home, "0755")
        holder = view.home
    else:
        holder = next((h for h in PROTECTED_HOMES if _inside(view.home, h)), "")
    _minimal_dev(devices)
    _read_only("/", recursive=True)
    for path in (*PRIVATE_TMP, "/dev/shm"):
        if os.path.isdir(path):
            _read_only(path, recursive=False, clear=True)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return Built(home=view.home, home_fd=home_fd, holder=holder)


def add_workdir(built: Built, workdir: str) -> None:
    """Bind the agent's own folder (inside the spoke's home) into the view, writable;
    the view keeps no way back to the rest of the home."""
    relative = os.path.relpath(workdir, built.home)
    if relative.startswith(".."):
        raise OSError(errno.EINVAL, f"{workdir} is not inside {built.home}")
    source = os.open(relative, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                     dir_fd=built.home_fd)
    os.close(built.home_fd)
    if built.holder:
        _read_only(built.holder, recursive=False, clear=True)
    os.makedirs(workdir, mode=0o755, exist_ok=True)
    if built.holder:
        _read_only(built.holder, recursive=False)
    _bind_from(source, workdir, recursive=False)
    os.close(source)
    _read_only(workdir, recursive=False, clear=True)


def _minimal_dev(devices: list[tuple[str, int]]) -> None:
    _tmpfs("/dev", "0755")
    for name, fd in devices:
        os.close(os.open(f"/dev/{name}", os.O_WRONLY | os.O_CREAT, 0o666))
        _bind_from(fd, f"/dev/{name}", recursive=False)
        os.close(fd)
    os.mkdir("/dev/shm")
    _tmpfs("/dev/shm", "1777")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")


SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def loopback_up() -> None:
    """Bring up `lo` in a new network namespace (it starts down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def become(uid: int, gid: int) -> None:
    """Drop to uid/gid with no supplementary groups; from root this also drops every
    capability."""
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def probe(level: str, agent_uid: int) -> str:
    """Try, in throwaway children, what starting an agent at this level needs (for
    "full", becoming agent_uid too): '' if it works, else why not. It forks: call it
    only in a single-threaded process (the launcher, or the command line)."""
    if level == FULL and os.geteuid() != 0:
        return "the spoke does not run as root, so it cannot give agents uids of their own"
    if level == NAMESPACES and os.geteuid() == 0:
        return "as root the spoke gives agents their own uids (isolation \"full\")"
    why_r, why_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(why_r)
            if level == NAMESPACES:
                enter_user_namespace(os.getuid(), os.getgid())
            unshare(CLONE_NEWPID)
            inner = os.fork()
            if inner == 0:
                unshare(CLONE_NEWNS | CLONE_NEWIPC)
                mount(None, "/", None, MS_REC | MS_PRIVATE)
                _tmpfs("/tmp", "1777")
                _read_only("/", recursive=True)
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                if level == FULL:
                    # Root in a user namespace (a rootless container) cannot.
                    become(agent_uid, agent_uid)
                os._exit(0)
            code = os.waitstatus_to_exitcode(os.waitpid(inner, 0)[1])
        except BaseException as exc:  # reported, then this child ends
            with contextlib.suppress(OSError):
                os.write(why_w, str(exc).encode())
        os._exit(code)
    os.close(why_w)
    with os.fdopen(why_r, "rb") as f:
        why = f.read().decode(errors="replace")
    status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    return "" if status == 0 else (why or f"a trial start ended with status {status}")
