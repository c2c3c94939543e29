"""Run a command as a plain user (uid and gid 65534, no supplementary groups), as a spoke
run by an ordinary account would be: `python as_plain_user.py [--no-userns] -- ARGV`.

Run as root. This test machine's interpreter lives under /root (mode 0700), which no
plain user may enter; the command gets a mount namespace of its own in which /root is an
empty folder with the interpreter's installation bound back, as an ordinary user's own
Python would be readable to it. With --no-userns, the command also runs where the kernel
refuses new user namespaces (user.max_user_namespaces = 0 in a user namespace of its
own), as on a machine that forbids them: a spoke must then refuse to start agents.

SIGTERM and SIGINT are passed on to the command; its exit status is this process's.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from spoke import sandbox

PLAIN = 65534


def _reachable_interpreter() -> None:
    """In a new mount namespace: /root emptied, the interpreter's installation, its
    virtual environment and this checkout bound back where they lie under it."""
    sandbox.mount(None, "/", None, sandbox.MS_REC | sandbox.MS_PRIVATE)
    checkout = str(Path(__file__).resolve().parents[2])
    prefixes = sorted({p for p in (sys.base_prefix, sys.prefix, checkout)
                       if p.startswith("/root/")})
    if not prefixes:
        return
    held = [(p, os.open(p, os.O_PATH | os.O_DIRECTORY)) for p in prefixes]
    sandbox.mount("tmpfs", "/root", "tmpfs", sandbox.MS_NOSUID | sandbox.MS_NODEV, "mode=0755")
    for path, fd in held:
        os.makedirs(path, mode=0o755, exist_ok=True)
        sandbox.mount(f"/proc/self/fd/{fd}", path, None, sandbox.MS_BIND | sandbox.MS_REC)
        os.close(fd)


def _become_plain() -> None:
    os.setgroups([])
    os.setresgid(PLAIN, PLAIN, PLAIN)
    os.setresuid(PLAIN, PLAIN, PLAIN)


def main(args: list[str]) -> int:
    no_userns = args[0] == "--no-userns"
    argv = args[args.index("--") + 1:]
    os.umask(0o022)
    if not no_userns:
        sandbox.unshare(sandbox.CLONE_NEWNS)
        _reachable_interpreter()
        _become_plain()
        os.execvp(argv[0], argv)
    # A user namespace whose root may lower the limit for what runs inside, mapping root
    # and the plain user to themselves.
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    child = os.fork()
    if child == 0:
        sandbox.unshare(sandbox.CLONE_NEWUSER | sandbox.CLONE_NEWNS)
        os.write(ready_w, b"1")
        os.read(go_r, 1)
        _reachable_interpreter()
        with open("/proc/sys/user/max_user_namespaces", "w") as f:
            f.write("0")
        _become_plain()
        os.execvp(argv[0], argv)
    os.read(ready_r, 1)
    for name, text in (("uid_map", f"0 0 1\n{PLAIN} {PLAIN} 1"),
                       ("gid_map", f"0 0 1\n{PLAIN} {PLAIN} 1")):
        with open(f"/proc/{child}/{name}", "w") as f:
            f.write(text)
    os.write(go_w, b"1")
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signo, _frame: os.kill(child, signo))
    while True:
        try:
            _, status = os.waitpid(child, 0)
            return os.waitstatus_to_exitcode(status)
        except InterruptedError:
            continue


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
