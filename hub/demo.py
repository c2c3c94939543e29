"""`fleetwire demo` and the local federation it builds: one hub, two spokes, two tenants,
on loopback, in a temporary folder, driven through the real command line.

The integration tests build their federations with the same LocalFederation.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.identity import load_identity
from spoke import procfs
from spoke.limits import spoke_bases
from spoke.shim import SUPERVISOR_FILE, read_json

FLEETWIRE = [sys.executable, "-m", "shared.cli"]
READY_TIMEOUT_SECONDS = 30.0
METRICS_RE = re.compile(r"metrics on http://(?P<address>\S+)/metrics\n")
READY_RE = re.compile(r" listening on (?P<address>\S+)(?: peers on (?P<peers>\S+))?")


@dataclass
class Daemon:
    role: str
    name: str
    home: Path
    proc: subprocess.Popen[str]
    address: str
    # Where other instances reach it (the hub's peer port; a spoke's only address).
    peer_address: str = ""

    def metrics_address(self, timeout: float = 10.0) -> str:
        """HOST:PORT of its /metrics, from the line a daemon started with --metrics prints
        right after the ready line. A thread, not select(): reading the ready line may
        have buffered this one already."""
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        found = METRICS_RE.fullmatch(got[0]) if got else None
        if found is None:
            raise RuntimeError(f"{self.role} '{self.name}' did not say where its metrics "
                               f"are served (got {got[0].strip() if got else ''!r})")
        return found["address"]

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then wait; SIGKILL only if it does not stop in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Into its log first: every thread's and task's stack, what it waits for.
                self.proc.send_signal(signal.SIGUSR1)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(1)
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        return self.proc.returncode


@dataclass
class LocalFederation:
    """Instances under one folder, made and run with the `fleetwire` command line."""

    root: Path
    echo: Callable[[str], None] | None = None
    daemons: list[Daemon] = field(default_factory=list)
    homes: dict[str, Path] = field(default_factory=dict)

    def cli(self, *args: str, check: bool = True, show: bool = True,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run `fleetwire ARGS`; show it in the transcript; raise if check and it fails."""
        shown = " ".join(shlex.quote(a) for a in args).replace(str(self.root) + "/", "")
        if self.echo and show:
            self.echo(f"$ fleetwire {shown}")
        result = self.run_cli(list(args), env or {})
        if self.echo and show:
            for line in (result.stdout + result.stderr).strip("\n").splitlines():
                self.echo(f"  {line}")
            if result.returncode:
                self.echo(f"  (exit code {result.returncode})")
        if check and result.returncode != 0:
            raise RuntimeError(f"fleetwire {shown} failed ({result.returncode}): "
                               f"{result.stderr.strip()}")
        return result

    def run_cli(self, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*FLEETWIRE, *args], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=120)

    def init(self, name: str) -> Path:
        home = self.root / name
        self.cli("init", "--home", str(home), "--name", name)
        self.homes[name] = home
        return home

    def public_key(self, name: str) -> str:
        """What `identity show` prints as public_key, read from the key file directly."""
        return load_identity(name, self.homes[name] / "identity.key").public_key_b64

    def trust(self, truster: str, peer: str, address: str = "") -> None:
        """`peer add` by hand: the peer's public key and its pinned TLS certificate."""
        args = ["peer", "add", "--home", str(self.homes[truster]), "--name", peer,
                "--public-key", self.public_key(peer),
                "--tls-cert", str(self.homes[peer] / "tls.crt")]
        self.cli(*args, *(["--address", address] if address else []))

    def start(self, role: str, name: str, listen: str = "127.0.0.1:0",
              *options: str, wrapper: tuple[str, ...] = ()) -> Daemon:
        """Start `fleetwire ROLE run [OPTIONS]` (behind a wrapper command, such as one that
        runs it as another user) and wait for its ready line."""
        home = self.homes[name]
        log = open(home / f"{role}.log", "a")  # noqa: SIM115 (kept open by the child)
        proc = subprocess.Popen(
            [*wrapper, *FLEETWIRE, role, "run", "--home", str(home), "--listen", listen,
             *options],
            stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
        log.close()
        address, peer_address = _read_ready_line(proc, home / f"{role}.log")
        daemon = Daemon(role=role, name=name, home=home, proc=proc, address=address,
                        peer_address=peer_address or address)
        self.daemons.append(daemon)
        if self.echo:
            self.echo(f"  {role} '{name}' serving on {address}")
        return daemon

    def agent_ids(self, name: str) -> list[str]:
        """Every agent id spoke `name` has recorded (read-only look at its state.db)."""
        db = self.homes[name] / "state.db"
        if not db.exists():
            return []
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            return [row[0] for row in conn.execute("SELECT agent_id FROM agents")]

    def agent_processes(self, name: str) -> list[procfs.ProcStat]:
        """Live processes of spoke `name`'s agents, found by their id marker."""
        markers = {f"{procfs.AGENT_ENV}={i}".encode() for i in self.agent_ids(name)}
        found = []
        for entry in os.scandir("/proc"):
            if not markers or not entry.name.isdigit():
                continue
            try:
                environ = Path(entry.path, "environ").read_bytes()
            except OSError:
                continue
            if markers.intersection(environ.split(b"\0")):
                st = procfs.read_stat(int(entry.name))
                if st is not None and st.alive:
                    found.append(st)
        return found

    def close(self) -> None:
        """Stop every daemon and kill anything their agents left running; wait for the
        agents' supervisors to record that and clean up after them (cgroups, uids)."""
        for daemon in reversed(self.daemons):
            daemon.stop()
        self.daemons.clear()
        for name in self.homes:
            for proc in self.agent_processes(name):
                procfs.signal_process(proc, signal.SIGKILL)
        for name, home in self.homes.items():
            _await_supervisors(home / "run")
            # What each spoke made for its agents (a stopping spoke leaves it while
            # agents run, and they were killed only now).
            for base in spoke_bases(name).values():
                with contextlib.suppress(OSError):
                    base.rmdir()


def _await_supervisors(run_root: Path, timeout: float = 10.0) -> None:
    """Wait for the supervisors whose agents were killed to finish; SIGKILL any left."""
    deadline = time.monotonic() + timeout
    for record in run_root.glob(f"*/{SUPERVISOR_FILE}"):
        found = read_json(record) or {}
        pid, start = int(found.get("pid", 0)), int(found.get("start_time") or 0)
        while procfs.is_same_process(pid, start) and time.monotonic() < deadline:
            time.sleep(0.02)
        procfs.signal_pid(pid, start, signal.SIGKILL)


def _read_ready_line(proc: subprocess.Popen[str], log_path: Path) -> tuple[str, str]:
    """(the address it listens on, where peers reach it if that differs, else "")."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            if sel.select(timeout=deadline - time.monotonic()):
                line = proc.stdout.readline()
                ready = READY_RE.search(line)
                if ready:
                    return ready["address"], ready["peers"] or ""
                if not line:
                    break
    finally:
        sel.close()
    proc.kill()
    proc.wait()
    raise RuntimeError(f"daemon did not become ready; its log:\n{log_path.read_text()[-2000:]}")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str,
             interval: float = 0.1) -> None:
    """Poll a condition until it holds; raise naming what did not happen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def run_demo(*, keep: bool = False) -> None:
    """The scripted walk-through behind `fleetwire demo`; exits non-zero if a step fails."""
    root = Path(tempfile.mkdtemp(prefix="fleetwire-demo-"))
    fed = LocalFederation(root=root, echo=print)
    step = 0

    def title(text: str) -> None:
        nonlocal step
        step += 1
        print(f"\n== {step}. {text}", flush=True)

    try:
        title(f"Create one hub and two spokes under {root}")
        for name in ("hub", "spoke-a", "spoke-b"):
            fed.init(name)

        title("Tenants and workspaces: acme (research) and globex (ops), on every instance")
        for name in fed.homes:
            for tenant in ("acme", "globex"):
                fed.cli("tenant", "create", "--home", str(fed.homes[name]), tenant)
        for spoke in ("spoke-a", "spoke-b"):
            home = str(fed.homes[spoke])
            fed.cli("workspace", "create", "--home", home, "--tenant", "acme", "research")
            fed.cli("workspace", "create", "--home", home, "--tenant", "globex", "ops")

        title("Start the hub: operators on TLS (pinned by fingerprint), spokes on mutual TLS")
        hub = fed.start("hub", "hub", "127.0.0.1:0", "--operator-tls")
        hub_fp = json.loads(fed.cli("identity", "show", "--home", str(fed.homes["hub"]),
                                    "--json", show=False).stdout)["tls_fingerprint"]
        print(f"  hub TLS certificate {hub_fp}")

        title("Join each spoke with a single-use token; each spoke grants the hub both "
              "tenants")
        for spoke in ("spoke-a", "spoke-b"):
            made = json.loads(fed.cli("join-token", "create", "--home", str(fed.homes["hub"]),
                                      "--name", spoke, "--ttl", "10m", "--json").stdout)
            fed.cli("join", "--home", str(fed.homes[spoke]), "--hub", hub.address,
                    "--token", made["token"])
            for tenant in ("acme", "globex"):
                fed.cli("grant", "add", "--home", str(fed.homes[spoke]), "--peer", "hub",
                        "--tenant", tenant)
        fed.cli("peer", "list", "--home", str(fed.homes["hub"]))

        title("One operator token per tenant")
        tokens = {}
        for tenant in ("acme", "globex"):
            out = fed.cli("token", "create", "--home", str(fed.homes["hub"]), "--tenant",
                          tenant, "--principal", f"{tenant}-ops", "--json").stdout
            tokens[tenant] = json.loads(out)["token"]
        acme = {"FLEETWIRE_HUB": hub.address, "FLEETWIRE_TOKEN": tokens["acme"],
                "FLEETWIRE_HUB_CA": hub_fp}
        globex = {**acme, "FLEETWIRE_TOKEN": tokens["globex"]}
        print("  (agent commands below read FLEETWIRE_HUB, FLEETWIRE_HUB_CA (the pin) and "
              "FLEETWIRE_TOKEN: acme's token unless marked [globex])")

        title("Start the spokes; their heartbeats tell the hub where they are")
        for spoke in ("spoke-a", "spoke-b"):
            fed.start("spoke", spoke)

        def online() -> bool:
            out = fed.cli("spoke", "list", "--json", env=acme, show=False).stdout
            spokes: list[dict[str, str]] = json.loads(out)
            return sum(s["status"] == "ONLINE" for s in spokes) == 2

        wait_for(online, 30, "both spokes to be ONLINE")
        fed.cli("spoke", "list", env=acme)

        def agent(*args: str, env: dict[str, str], check: bool = True,
                  label: str = "") -> subprocess.CompletedProcess[str]:
            if label:
                print(f"  [{label}]")
            return fed.cli("agent", *args, env=env, check=check)

        title("Spawn two acme agents: a short one on spoke-a, a long one on spoke-b")
        short = json.loads(agent("spawn", "--spoke", "spoke-a", "--workspace", "research",
                                 "--template", "demo", "--task", "summarize",
                                 "--param", "steps=4", "--param", "interval=0.2", "--json",
                                 env=acme).stdout)
        long = json.loads(agent("spawn", "--spoke", "spoke-b", "--workspace", "research",
                                "--template", "demo", "--task", "crawl",
                                "--param", "steps=100000", "--json", env=acme).stdout)

        title("The short agent's status, from the hub's registry (fed by the spokes' "
              "reports), until it has finished")

        def finished() -> bool:
            out = agent("status", short["agent_id"], "--json", env=acme, check=True).stdout
            return bool(json.loads(out)["state"] == "SUCCEEDED")

        wait_for(finished, 30, "the short agent to succeed", interval=0.5)

        title("The spokes as the hub sees them, and the short agent's output")
        fed.cli("spoke", "list", env=acme)
        agent("logs", short["agent_id"], "--tail", "3", env=acme)

        title("List acme's agents across both spokes")
        agent("list", env=acme)

        title("globex cannot see acme's agent: status and kill answer NOT_FOUND (exit 3)")
        for args in (("status", long["agent_id"]), ("kill", long["agent_id"])):
            result = agent(*args, env=globex, check=False, label="globex")
            if result.returncode != 3:
                raise RuntimeError(f"globex {args[0]} answered {result.returncode}, not 3")
        agent("list", env=globex, label="globex")

        title("Kill the long agent while it runs; nothing of it is left")
        killed = json.loads(agent("kill", long["agent_id"], "--grace", "3", "--json",
                                  env=acme).stdout)
        if killed["state"] != "KILLED" or fed.agent_processes("spoke-b"):
            raise RuntimeError("the long agent was not killed cleanly")
        print("  no process of the agent is left on spoke-b")

        title("Final list")
        agent("list", env=acme)

        title("Each instance's audit trail: what it decided, and an intact hash chain")
        fed.cli("audit", "list", "--home", str(fed.homes["spoke-b"]), "--tenant", "acme")
        fed.cli("audit", "list", "--home", str(fed.homes["hub"]), "--tenant", "globex")
        for name in fed.homes:
            fed.cli("audit", "verify", "--home", str(fed.homes[name]))

        title("Stop the daemons and clean up")
        fed.close()
        print("  daemons stopped")
    finally:
        fed.close()
        if keep:
            print(f"\nkept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print("\ndemo finished: every step succeeded")

