#!/usr/bin/env python3
"""A hub and N spokes on this machine, each a separate process with its own home.

    deploy/federation.py up [--root DIR] [--spokes N] [--tenant T] [--workspace W]
                            [--principal P] [--hub-database-url URL] [--metrics]
                            [--detach] [--verbose]
    deploy/federation.py env --root DIR     # the export lines again, for eval
    deploy/federation.py stop --root DIR    # stop a federation started with `up`

`up` makes ROOT/hub and ROOT/spoke-1 .. ROOT/spoke-N with `fleetwire init`, starts the hub
on free loopback ports (operators on TLS pinned by fingerprint, spokes on mutual TLS),
joins every spoke with a single-use join token, creates one tenant and workspace with a
grant to the hub on every spoke, starts the spokes (also on free ports, read back from
their ready lines), waits until the hub sees them all ONLINE, makes an operator token
and prints the FLEETWIRE_HUB / FLEETWIRE_HUB_CA / FLEETWIRE_TOKEN lines to use it. It
then stays in the foreground until Ctrl-C or SIGTERM (or `stop`), and stops everything:
each spoke is drained (its agents killed through the daemon, recorded KILLED), then the
spokes and the hub get SIGTERM, and any agent process still left is killed. With
--detach it runs in the background (log in ROOT/federation.log) and returns once ready.

Every command is the real `fleetwire` command line; the building blocks are those of
`fleetwire demo` (hub/demo.py). Embedded SQLite (the hub on PostgreSQL with
--hub-database-url postgresql+asyncpg://USER:PASSWORD@HOST:PORT/DB, an empty database it
migrates), loopback only: for trying things out and for tests, not for production (see
deploy/README.md for that).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

STATE_FILE = "federation.json"
ENV_FILE = "env.sh"
LOG_FILE = "federation.log"
STOP_TIMEOUT_SECONDS = 120.0
# Variables that would reach the daemons and CLI calls and change them: a FLEETWIRE_HOME
# or FLEETWIRE_DATABASE_URL from the caller's shell must not point every instance at
# one place. FLEETWIRE_LOG_FORMAT is harmless and kept.
KEEP_ENV = {"FLEETWIRE_LOG_FORMAT"}
DATABASE_URL_ENV = "FEDERATION_HUB_DATABASE_URL"


def _fleetwire() -> tuple[ModuleType, ModuleType]:
    """hub.demo and spoke.procfs, from the Python that has Fleetwire installed. Run with
    another one (`python3 deploy/federation.py`), re-run with the repository's .venv."""
    try:
        import hub.demo
        import spoke.procfs
    except ModuleNotFoundError:
        venv_python = Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python"
        if venv_python.exists() and Path(sys.executable) != venv_python:
            os.execv(venv_python, [str(venv_python), __file__, *sys.argv[1:]])
        sys.exit("federation.py: cannot import fleetwire; run it with the Python that has "
                 "it installed (e.g. .venv/bin/python deploy/federation.py ...)")
    return hub.demo, spoke.procfs


def _write_private(path: Path, text: str) -> None:
    """Write a file only the owner can read (it holds an operator token), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _read_state(root: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads((root / STATE_FILE).read_text())
    except FileNotFoundError:
        sys.exit(f"federation.py: no federation in {root} ({STATE_FILE} is missing)")
    return state


def _exports(state: dict[str, Any]) -> str:
    return (f"export FLEETWIRE_HUB={state['hub']}\n"
            f"export FLEETWIRE_HUB_CA={state['hub_ca']}\n"
            f"export FLEETWIRE_TOKEN={state['token']}\n")


def _usage(state: dict[str, Any], root: Path) -> str:
    script = os.path.relpath(__file__)
    script = script if not script.startswith("..") else __file__
    spokes = ", ".join(f"{n} on {a}" for n, a in state["spokes"].items())
    first = next(iter(state["spokes"]))
    return (
        f"\nfederation up in {root}\n"
        f"  hub '{state['hub_name']}' on {state.get('hub_database', 'sqlite')}: operators on "
        f"{state['hub']} (TLS), spokes reach it on {state['hub_peers']} (mutual TLS)\n"
        f"  spokes: {spokes}\n"
        f"  tenant '{state['tenant']}' with workspace '{state['workspace']}' on every spoke; "
        f"operator token for '{state['principal']}' (role admin)\n"
        + "".join(f"  metrics of {n}: {u}\n" for n, u in state.get("metrics", {}).items())
        + f"  logs: {root}/<instance>/hub.log and spoke.log\n\n"
        f"Use it (fleetwire from this project's .venv/bin on PATH):\n\n"
        f"{_exports(state)}"
        f"\n  # or: eval \"$({script} env --root {root})\"\n"
        f"  fleetwire spoke list\n"
        f"  fleetwire agent spawn --spoke {first} --workspace {state['workspace']} "
        f"--template demo --task hello\n"
        f"  fleetwire agent list\n\n"
        f"Stop everything: Ctrl-C here, or `{script} stop --root {root}`.\n"
    )


class Federation:
    """One `up` run: builds the federation, waits for a stop, takes it all down."""

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.demo, self.procfs = _fleetwire()
        self.args = args
        self.root = root
        self.stop_requested = threading.Event()
        self.fed = self.demo.LocalFederation(root=root, echo=print if args.verbose else None)
        self.spoke_names = [f"spoke-{i}" for i in range(1, args.spokes + 1)]
        self.metrics: dict[str, str] = {}
        self.state_lock = threading.Lock()
        self.started = time.monotonic()
        self.daemon_options = ["--metrics", "127.0.0.1:0"] if args.metrics else []

    def _on_signal(self, signum: int, _frame: object) -> None:
        if not self.stop_requested.is_set():
            print(f"\n{signal.Signals(signum).name}: stopping the federation", flush=True)
        self.stop_requested.set()

    def _step(self, text: str) -> None:
        """Report progress; between steps, honour a stop asked for meanwhile (a step is
        never cut in half, so no daemon is left started but unrecorded)."""
        if self.stop_requested.is_set():
            raise KeyboardInterrupt
        print(f"- [{time.monotonic() - self.started:5.1f} s] {text}", flush=True)

    def run(self) -> int:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        try:
            state = self._build()
            print(_usage(state, self.root), flush=True)
            return self._wait()
        except KeyboardInterrupt:
            return 0
        except Exception as exc:
            print(f"federation.py: {exc}", file=sys.stderr, flush=True)
            return 1
        finally:
            # Nothing interrupts the clean-up; a second Ctrl-C is only acknowledged.
            self._shutdown()

    def _build(self) -> dict[str, Any]:
        fed, args, cli = self.fed, self.args, self.fed.cli

        def home(name: str) -> str:
            return str(fed.homes[name])

        self._step(f"init hub and {len(self.spoke_names)} spoke(s) under {self.root}, each "
                   f"with tenant '{args.tenant}' (and workspace '{args.workspace}' on spokes)")

        def make(name: str) -> None:
            if name == "hub" and args.hub_database_url:
                self._init_hub_on(args.hub_database_url)
            else:
                fed.init(name)
            cli("tenant", "create", "--home", home(name), args.tenant)
            if name != "hub":
                cli("workspace", "create", "--home", home(name), "--tenant", args.tenant,
                    args.workspace)

        self._each(make, ["hub", *self.spoke_names])

        self._step("start the hub")
        hub = self._start("hub", "hub", "--operator-tls")
        hub_ca = json.loads(cli("identity", "show", "--home", home("hub"), "--json",
                                show=False).stdout)["tls_fingerprint"]
        self._write_state(hub=hub, hub_ca=hub_ca, token="", ready=False)

        self._step("join every spoke with a single-use join token; each grants the hub "
                   f"'{args.tenant}'")
        # One at a time on the hub's home; the joins themselves go through the hub daemon.
        join_tokens = {name: json.loads(cli("join-token", "create", "--home", home("hub"),
                                            "--name", name, "--ttl", "10m", "--json",
                                            show=False).stdout)["token"]
                       for name in self.spoke_names}

        def join(name: str) -> None:
            cli("join", "--home", home(name), "--hub", hub.address, "--token", join_tokens[name])
            cli("grant", "add", "--home", home(name), "--peer", "hub", "--tenant", args.tenant,
                "--max-role", "admin")

        self._each(join, self.spoke_names)

        self._step("operator token")
        token = json.loads(cli("token", "create", "--home", home("hub"), "--tenant",
                               args.tenant, "--principal", args.principal, "--role", "admin",
                               "--json", show=False).stdout)["token"]
        operator = {"FLEETWIRE_HUB": hub.address, "FLEETWIRE_HUB_CA": hub_ca,
                    "FLEETWIRE_TOKEN": token}

        self._step(f"start {', '.join(self.spoke_names)}")

        def start(name: str) -> None:
            self._start("spoke", name)
            self._write_state(hub=hub, hub_ca=hub_ca, token=token, ready=False)

        self._each(start, self.spoke_names)

        self._step("wait until the hub sees every spoke ONLINE")

        def all_online() -> bool:
            if self.stop_requested.is_set():
                raise KeyboardInterrupt
            out = cli("spoke", "list", "--json", env=operator, show=False).stdout
            online = {s["name"] for s in json.loads(out) if s["status"] == "ONLINE"}
            return online >= set(self.spoke_names)

        self.demo.wait_for(all_online, 60, "every spoke to be ONLINE", interval=0.3)
        state = self._write_state(hub=hub, hub_ca=hub_ca, token=token, ready=True)
        _write_private(self.root / ENV_FILE, _exports(state))
        return state

    @staticmethod
    def _each(fn: Callable[[str], None], names: list[str]) -> None:
        """fn(name) for every instance at once (their homes are separate); the first
        failure is raised once all have finished, so nothing runs on unseen."""
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            futures = [pool.submit(fn, name) for name in names]
        for future in futures:
            future.result()

    def _init_hub_on(self, url: str) -> None:
        """`init` the hub with FLEETWIRE_DATABASE_URL (so it migrates that database), then
        write the URL into its config.toml, where every later command and the daemon read
        it. Only the hub gets it: each spoke keeps its own SQLite."""
        home = self.root / "hub"
        self.fed.cli("init", "--home", str(home), "--name", "hub",
                     env={"FLEETWIRE_DATABASE_URL": url})
        self.fed.homes["hub"] = home
        with open(home / "config.toml", "a") as f:
            f.write(f"\n[database]\nurl = {json.dumps(url)}\n")

    def _start(self, role: str, name: str, *options: str) -> Any:
        """`fleetwire ROLE run` on free loopback ports; with --metrics, also read the line
        that says where its /metrics is served (printed right after the ready line)."""
        daemon = self.fed.start(role, name, "127.0.0.1:0", *options, *self.daemon_options)
        if self.daemon_options:
            url = f"http://{daemon.metrics_address()}/metrics"
            with self.state_lock:  # spokes start at once; _write_state reads this
                self.metrics[name] = url
        return daemon

    def _write_state(self, *, hub: Any, hub_ca: str, token: str, ready: bool) -> dict[str, Any]:
        """What `env` and `stop` need, and what a test reads: written at each change, so
        that `stop` finds every daemon even if this process dies."""
        with self.state_lock:
            return self._write_state_locked(hub, hub_ca, token, ready)

    def _write_state_locked(self, hub: Any, hub_ca: str, token: str,
                            ready: bool) -> dict[str, Any]:
        me = self.procfs.read_stat(os.getpid())
        state = {
            "ready": ready,
            "pid": os.getpid(), "start_time": me.start_time if me else None,
            "hub_name": "hub", "hub": hub.address, "hub_peers": hub.peer_address,
            "hub_database": "postgresql" if self.args.hub_database_url else "sqlite",
            "hub_ca": hub_ca, "token": token, "tenant": self.args.tenant,
            "workspace": self.args.workspace, "principal": self.args.principal,
            "spokes": {d.name: d.address for d in self.fed.daemons if d.role == "spoke"},
            "metrics": dict(self.metrics),
            "homes": {n: str(h) for n, h in self.fed.homes.items()},
            "daemons": [self._daemon_record(d) for d in self.fed.daemons],
        }
        _write_private(self.root / STATE_FILE, json.dumps(state, indent=2) + "\n")
        return state

    def _daemon_record(self, daemon: Any) -> dict[str, Any]:
        st = self.procfs.read_stat(daemon.proc.pid)
        return {"role": daemon.role, "name": daemon.name, "pid": daemon.proc.pid,
                "start_time": st.start_time if st else None}

    def _wait(self) -> int:
        """Until a stop is asked for; a daemon that dies meanwhile stops everything."""
        while not self.stop_requested.wait(0.5):
            for daemon in self.fed.daemons:
                code = daemon.proc.poll()
                if code is not None:
                    log = daemon.home / f"{daemon.role}.log"
                    tail = log.read_text()[-1500:] if log.exists() else ""
                    print(f"federation.py: {daemon.role} '{daemon.name}' exited with code "
                          f"{code}; stopping the rest. Its log ends:\n{tail}",
                          file=sys.stderr, flush=True)
                    return 1
        return 0

    def _shutdown(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on_signal)
        self.stop_requested.set()
        spokes = [d for d in self.fed.daemons if d.role == "spoke" and d.proc.poll() is None]
        if spokes:
            print(f"- drain {', '.join(d.name for d in spokes)}: every agent killed through "
                  "its spoke", flush=True)
            drains = [subprocess.Popen(
                [*self.demo.FLEETWIRE, "spoke", "drain", "--home", str(d.home), "--reason",
                 "federation stopping", "--timeout", "60"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                for d in spokes]
            for daemon, drain in zip(spokes, drains, strict=True):
                _, err = drain.communicate()
                if drain.returncode:
                    print(f"  drain of {daemon.name} failed ({drain.returncode}): "
                          f"{err.strip()}", flush=True)
        if self.fed.daemons:
            print("- stop the spokes, then the hub (SIGTERM)", flush=True)
        # SIGTERM to each daemon (newest first), SIGKILL to any agent process left.
        self.fed.close()
        state_path = self.root / STATE_FILE
        if state_path.exists():
            state = json.loads(state_path.read_text())
            state.update(ready=False, stopped=True)
            _write_private(state_path, json.dumps(state, indent=2) + "\n")
        print(f"federation stopped; homes and logs are kept in {self.root}", flush=True)


def _clean_environment() -> None:
    for key in list(os.environ):
        if key.startswith("FLEETWIRE_") and key not in KEEP_ENV:
            del os.environ[key]


def cmd_up(args: argparse.Namespace) -> int:
    if args.spokes < 1:
        sys.exit("federation.py: --spokes must be at least 1")
    _fleetwire()  # before anything else: it may re-run this script with another Python
    root = Path(args.root).resolve() if args.root else \
        Path(tempfile.mkdtemp(prefix="fleetwire-federation-"))
    if (root / STATE_FILE).exists() or (root / "hub").exists():
        sys.exit(f"federation.py: {root} already holds a federation; stop it and remove the "
                 "folder, or pick another --root")
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    _clean_environment()
    if args.detach:
        return _detach(args, root)
    return Federation(args, root).run()


def _detach(args: argparse.Namespace, root: Path) -> int:
    """Run `up` in a new session with its output in ROOT/federation.log; return once it is
    ready (print how to use it) or has failed (print its log)."""
    argv = [sys.executable, os.path.abspath(__file__), "up", "--root", str(root),
            "--spokes", str(args.spokes), "--tenant", args.tenant, "--workspace",
            args.workspace, "--principal", args.principal, *(["--verbose"] * args.verbose),
            *(["--metrics"] * args.metrics)]
    # The database URL holds a password: pass it in the environment, not on a command line
    # that `ps` shows.
    env = {**os.environ, DATABASE_URL_ENV: args.hub_database_url}
    with open(root / LOG_FILE, "ab") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, env=env)
    state_path = root / STATE_FILE
    while proc.poll() is None:
        try:
            state = json.loads(state_path.read_text())
        except (FileNotFoundError, ValueError):
            state = {}
        if state.get("ready"):
            print(_usage(state, root), flush=True)
            print(f"running in the background (pid {proc.pid}); log in {root / LOG_FILE}")
            return 0
        time.sleep(0.2)
    print((root / LOG_FILE).read_text()[-3000:], file=sys.stderr)
    return proc.returncode or 1


def cmd_env(args: argparse.Namespace) -> int:
    state = _read_state(Path(args.root))
    if not state.get("ready"):
        sys.exit(f"federation.py: the federation in {args.root} is not running")
    sys.stdout.write(_exports(state))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM the `up` process and wait for it to finish its clean-up. If it is gone
    (killed), stop the daemons it recorded and any agent process they left."""
    demo, procfs = _fleetwire()
    root = Path(args.root).resolve()
    state = _read_state(root)

    def alive(rec: dict[str, Any]) -> bool:
        return bool(rec.get("start_time")) and procfs.is_same_process(rec["pid"],
                                                                       rec["start_time"])

    if alive(state):
        os.kill(state["pid"], signal.SIGTERM)
        try:
            demo.wait_for(lambda: not alive(state), STOP_TIMEOUT_SECONDS,
                          "the federation to stop", interval=0.2)
        except TimeoutError as exc:
            sys.exit(f"federation.py: {exc}; its log: {root / LOG_FILE} (with --detach)")
        print(f"federation in {root} stopped")
        return 0
    daemons = [d for d in state.get("daemons", []) if alive(d)]
    for rec in reversed(daemons):
        os.kill(rec["pid"], signal.SIGTERM)
        try:
            demo.wait_for(lambda rec=rec: not alive(rec), 15, f"{rec['name']} to stop")
        except TimeoutError:
            os.kill(rec["pid"], signal.SIGKILL)
    fed = demo.LocalFederation(root=root)
    fed.homes = {n: Path(h) for n, h in state.get("homes", {}).items()}
    left = [p for n in fed.homes for p in fed.agent_processes(n)]
    fed.close()  # kills them, and waits for their supervisors to clean up
    print(f"the federation's supervisor was not running; stopped {len(daemons)} daemon(s) "
          f"and killed {len(left)} agent process(es)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="federation.py", description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build and run a hub and N spokes until stopped")
    up.add_argument("--root", help="folder for the homes (default: a new temporary one)")
    up.add_argument("--spokes", type=int, default=2, help="how many spokes (default 2)")
    up.add_argument("--tenant", default="acme")
    up.add_argument("--workspace", default="research")
    up.add_argument("--principal", default="ops", help="the operator token's principal")
    up.add_argument("--hub-database-url", default=os.environ.get(DATABASE_URL_ENV, ""),
                    metavar="URL", help="run the hub on this (empty) PostgreSQL database "
                    f"instead of SQLite (or {DATABASE_URL_ENV})")
    up.add_argument("--metrics", action="store_true",
                    help="serve each daemon's Prometheus metrics on a free loopback port")
    up.add_argument("--detach", action="store_true",
                    help="run in the background; return once every spoke is ONLINE")
    up.add_argument("--verbose", action="store_true", help="show every fleetwire command")
    up.set_defaults(func=cmd_up)
    env = sub.add_parser("env", help="print the export lines of a running federation")
    env.add_argument("--root", required=True)
    env.set_defaults(func=cmd_env)
    stop = sub.add_parser("stop", help="stop a federation started with up")
    stop.add_argument("--root", required=True)
    stop.set_defaults(func=cmd_stop)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
