"""deploy/: the example configs load through the real loader, the Containerfile copies
only files that exist, the units keep what agents need, and deploy/federation.py brings
up a hub with N spokes as real processes, serves agents, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub.demo import wait_for
from shared.config import load_config
from spoke import procfs
from tests.integration.helpers import processes_with_marker

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
FEDERATION = DEPLOY / "federation.py"
HEALTHCHECK = DEPLOY / "healthcheck.py"
FLEETWIRE = [sys.executable, "-m", "shared.cli"]
UP_TIMEOUT = 240.0


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without FLEETWIRE_* settings that would change what is tested."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWIRE_")}
    return {**env, **extra}


# --- example configs ------------------------------------------------------------------


@pytest.fixture
def no_fleetwire_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("FLEETWIRE_"):
            monkeypatch.delenv(key)


def load_example(tmp_path: Path, name: str, text: str | None = None) -> Any:
    home = tmp_path / name
    home.mkdir()
    example = DEPLOY / "examples" / name
    (home / "config.toml").write_text(example.read_text() if text is None else text)
    return load_config(home)


@pytest.mark.usefixtures("no_fleetwire_env")
def test_every_example_config_loads(tmp_path: Path) -> None:
    examples = sorted(p.name for p in (DEPLOY / "examples").glob("*.toml"))
    assert examples == ["hub.config.toml", "spoke.config.toml"]
    hub = load_example(tmp_path, "hub.config.toml")
    assert hub.name == "hub"
    assert hub.database.url == ""  # SQLite by default; PostgreSQL is commented
    spoke = load_example(tmp_path, "spoke.config.toml")
    assert {"demo", "report"} <= set(spoke.templates)
    assert spoke.templates["report"].params == {"dataset": "sales"}


@pytest.mark.usefixtures("no_fleetwire_env")
def test_hub_example_with_its_postgresql_line_uncommented(tmp_path: Path) -> None:
    text = (DEPLOY / "examples" / "hub.config.toml").read_text()
    commented = re.search(r'^#\s*(url = "postgresql\+asyncpg://[^"]+")$', text, re.M)
    assert commented, "the hub example should show a PostgreSQL url, commented"
    text = re.sub(r'^url = ""$', commented[1], text, flags=re.M)
    cfg = load_example(tmp_path, "hub.config.toml", text)
    assert cfg.db_url.startswith("postgresql+asyncpg://")


# --- Containerfile and units, as text -------------------------------------------------


def test_containerfile_copies_only_files_that_exist() -> None:
    text = (DEPLOY / "Containerfile").read_text().replace("\\\n", " ")
    copies = [line.split()[1:] for line in text.splitlines()
              if line.strip().upper().startswith("COPY")]
    assert copies
    for args in copies:
        if any(a.startswith("--from") for a in args):
            continue
        sources = [a for a in args[:-1] if not a.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"Containerfile copies {source}, which is missing"


def unit(name: str) -> dict[str, list[str]]:
    """KEY -> every value it is given in a unit file (comments and sections dropped)."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_spoke_unit_keeps_what_agents_need() -> None:
    spoke = unit("fleetwire-spoke.service")
    assert spoke["KillMode"] == ["process"]  # a restart does not kill agents
    assert spoke["Delegate"] == ["yes"]  # the spoke may make per-agent cgroups
    # A read-only /sys/fs/cgroup would undo the delegation; W^X would break JIT runtimes
    # in agents (they inherit it); an OOM kill of one agent must not stop the spoke.
    assert spoke.get("ProtectControlGroups", ["no"]) == ["no"]
    assert spoke.get("MemoryDenyWriteExecute", ["no"]) == ["no"]
    assert spoke["OOMPolicy"] == ["continue"]
    # Root with what isolating agents takes and nothing more (ADR 0023); the uid claims
    # under /run/fleetwire outlive a restart, as the supervisors holding them do.
    assert spoke["User"] == ["root"]
    assert set(spoke["CapabilityBoundingSet"][0].split()) == {
        "CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_CHOWN", "CAP_KILL",
        "CAP_SYS_PTRACE", "CAP_NET_ADMIN"}
    assert spoke["RuntimeDirectory"] == ["fleetwire"]
    assert spoke["RuntimeDirectoryPreserve"] == ["yes"]
    assert set(spoke["RestrictNamespaces"][0].split()) == {"mnt", "pid", "ipc", "net"}
    assert "@mount" in spoke["SystemCallFilter"][0].split()
    hub = unit("fleetwire-hub.service")
    assert hub["MemoryDenyWriteExecute"] == ["yes"]
    assert hub["CapabilityBoundingSet"] == [""]
    for u in (spoke, hub):
        assert u["NoNewPrivileges"] == ["yes"]
        assert u["ProtectSystem"] == ["strict"]


# --- deploy/federation.py -------------------------------------------------------------


def processes_under(root: Path) -> list[int]:
    """Live processes whose command line or working folder is under root."""
    found = []
    needle = str(root).encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = Path(entry.path, "cmdline").read_bytes()
            cwd = os.readlink(Path(entry.path, "cwd"))
        except OSError:
            continue
        st = procfs.read_stat(int(entry.name))
        if st is not None and st.alive and (needle in cmdline or cwd.startswith(str(root))):
            found.append(int(entry.name))
    return found


class Up:
    """`deploy/federation.py up` as a child process, and what it wrote down."""

    def __init__(self, root: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.log = root.parent / f"{root.name}.out"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, str(FEDERATION), "up", "--root", str(root), *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env or clean_env(), start_new_session=True)

    def state(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.root / "federation.json").read_text()))
        except (FileNotFoundError, ValueError):
            return {}

    def wait_ready(self) -> dict[str, Any]:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"federation.py up exited with {self.proc.returncode}:\n"
                                     f"{self.log.read_text()[-3000:]}")
            return bool(self.state().get("ready"))

        wait_for(ready, UP_TIMEOUT, "the federation to be ready")
        return self.state()

    def close(self) -> None:
        """Whatever happened: stop it, then kill anything still running under root."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid in processes_under(self.root):
            st = procfs.read_stat(pid)
            if st is not None:
                procfs.signal_process(st, signal.SIGKILL)


@pytest.fixture
def up_runs() -> Iterator[list[Up]]:
    runs: list[Up] = []
    try:
        yield runs
    finally:
        for run in runs:
            run.close()


def operator(state: dict[str, Any], *args: str, check: bool = True) -> Any:
    """`fleetwire ARGS --json` as an operator, with the lines federation.py printed."""
    env = clean_env(FLEETWIRE_HUB=state["hub"], FLEETWIRE_HUB_CA=state["hub_ca"],
                    FLEETWIRE_TOKEN=state["token"])
    result = subprocess.run([*FLEETWIRE, *args, "--json"], capture_output=True, text=True,
                            env=env, timeout=120)
    if check:
        assert result.returncode == 0, f"fleetwire {' '.join(args)}: {result.stderr}"
    return json.loads(result.stdout) if result.returncode == 0 else None


def agent_state(state: dict[str, Any], agent_id: str) -> str:
    return str(operator(state, "agent", "status", agent_id)["state"])


def spoke_agents(home: Path) -> dict[str, str]:
    with sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True) as conn:
        return dict(conn.execute("SELECT agent_id, state FROM agents").fetchall())


def healthcheck(*args: str) -> int:
    return subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True,
                          env=clean_env(), timeout=60).returncode


def alive(pid: int, start_time: int) -> bool:
    return procfs.is_same_process(pid, start_time)


def assert_all_gone(root: Path, state: dict[str, Any], agent_ids: list[str]) -> None:
    """The supervisor, every daemon and every agent process have gone."""
    recorded = [state, *state["daemons"]]
    wait_for(lambda: not any(alive(r["pid"], r["start_time"]) for r in recorded), 30,
               "the supervisor and every daemon to be gone")
    for agent_id in agent_ids:
        assert processes_with_marker(agent_id) == [], f"agent {agent_id} left a process"
    assert processes_under(root) == []


@pytest.mark.timeout(600)
def test_federation_script_with_three_spokes(tmp_path: Path, up_runs: list[Up]) -> None:
    root = tmp_path / "fed"
    run = Up(root, "--spokes", "3", "--metrics")
    up_runs.append(run)
    state = run.wait_ready()
    assert sorted(state["spokes"]) == ["spoke-1", "spoke-2", "spoke-3"]
    assert "export FLEETWIRE_TOKEN=" in run.log.read_text()
    env_lines = subprocess.run([sys.executable, str(FEDERATION), "env", "--root", str(root)],
                               capture_output=True, text=True, env=clean_env(), check=True)
    assert f"export FLEETWIRE_HUB={state['hub']}" in env_lines.stdout

    # One long agent on every spoke, spawned through the hub with the real CLI, and one
    # that exits by itself.
    spawn = ["agent", "spawn", "--workspace", "research", "--template", "demo"]
    long = {name: operator(state, *spawn, "--spoke", name, "--task", f"long on {name}",
                           "--param", "steps=100000")["agent_id"]
            for name in state["spokes"]}
    short = operator(state, *spawn, "--spoke", "spoke-1", "--task", "short",
                     "--param", "steps=2", "--param", "interval=0.1")["agent_id"]
    for agent_id in long.values():
        wait_for(lambda a=agent_id: agent_state(state, a) == "RUNNING", 60,
                   f"agent {agent_id} to be RUNNING")
        assert processes_with_marker(agent_id)
    wait_for(lambda: agent_state(state, short) == "SUCCEEDED", 60,
               "the short agent to exit 0")
    listed = {a["agent_id"]: a["spoke"] for a in operator(state, "agent", "list")}
    assert listed == {**{a: s for s, a in long.items()}, short: "spoke-1"}

    # The probes deploy/compose.yaml uses: the hub's gRPC health over TLS, a spoke's
    # metrics endpoint.
    hub_crt = str(root / "hub" / "tls.crt")
    assert healthcheck("grpc", state["hub"], "--ca", hub_crt,
                       "--service", "fleetwire.v1.OperatorService") == 0
    assert healthcheck("http", state["metrics"]["spoke-1"]) == 0

    stop = subprocess.run([sys.executable, str(FEDERATION), "stop", "--root", str(root)],
                          capture_output=True, text=True, env=clean_env(), timeout=180)
    assert stop.returncode == 0, stop.stderr
    assert run.proc.wait(30) == 0, run.log.read_text()[-3000:]
    assert_all_gone(root, state, [*long.values(), short])
    # Each spoke drained: its long agent was killed through the daemon and recorded so.
    for name, agent_id in long.items():
        assert spoke_agents(root / name)[agent_id] == "KILLED"
    assert healthcheck("grpc", state["hub"], "--ca", hub_crt) == 1
    assert "federation stopped" in run.log.read_text()


@pytest.mark.timeout(400)
def test_stop_cleans_up_after_a_killed_supervisor(tmp_path: Path, up_runs: list[Up]) -> None:
    """`up --detach` returns once ready; if the process that runs the federation dies
    (SIGKILL: no clean-up), `stop` still stops its daemons and agents."""
    root = tmp_path / "fed"
    detach = subprocess.run([sys.executable, str(FEDERATION), "up", "--root", str(root),
                             "--spokes", "1", "--detach"], capture_output=True, text=True,
                            env=clean_env(), timeout=UP_TIMEOUT)
    assert detach.returncode == 0, detach.stderr
    assert "export FLEETWIRE_HUB_CA=sha256:" in detach.stdout
    state = json.loads((root / "federation.json").read_text())
    assert state["ready"]
    agent_id = operator(state, "agent", "spawn", "--spoke", "spoke-1", "--workspace",
                        "research", "--template", "demo", "--task", "orphan",
                        "--param", "steps=100000")["agent_id"]
    try:
        wait_for(lambda: agent_state(state, agent_id) == "RUNNING", 60, "RUNNING")
        os.kill(state["pid"], signal.SIGKILL)
        wait_for(lambda: not alive(state["pid"], state["start_time"]), 30,
                   "the supervisor to die")
        stop = subprocess.run([sys.executable, str(FEDERATION), "stop", "--root", str(root)],
                              capture_output=True, text=True, env=clean_env(), timeout=120)
        assert stop.returncode == 0, stop.stderr
        assert "stopped 2 daemon(s) and killed" in stop.stdout
        assert_all_gone(root, state, [agent_id])
    finally:
        for pid in processes_under(root):
            st = procfs.read_stat(pid)
            if st is not None:
                procfs.signal_process(st, signal.SIGKILL)


@pytest.mark.timeout(400)
def test_federation_script_with_the_hub_on_postgresql(tmp_path: Path,
                                                      up_runs: list[Up]) -> None:
    """--hub-database-url: the hub keeps its state in PostgreSQL, the spoke in SQLite."""
    from tests.databases import create_database, drop_database, postgres_url

    url = asyncio.run(create_database(postgres_url()))
    try:
        root = tmp_path / "fed"
        run = Up(root, "--spokes", "1",
                 env=clean_env(FEDERATION_HUB_DATABASE_URL=url))
        up_runs.append(run)
        state = run.wait_ready()
        assert state["hub_database"] == "postgresql"
        assert not (root / "hub" / "state.db").exists()
        agent_id = operator(state, "agent", "spawn", "--spoke", "spoke-1", "--workspace",
                            "research", "--template", "demo", "--task", "pg",
                            "--param", "steps=2", "--param", "interval=0.1")["agent_id"]
        wait_for(lambda: agent_state(state, agent_id) == "SUCCEEDED", 60, "SUCCEEDED")
        run.proc.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends
        assert run.proc.wait(120) == 0, run.log.read_text()[-3000:]
        assert_all_gone(root, state, [agent_id])
    finally:
        for run in up_runs:
            run.close()
        asyncio.run(drop_database(url))


def test_federation_script_refuses_a_used_root(tmp_path: Path) -> None:
    (tmp_path / "hub").mkdir()
    result = subprocess.run([sys.executable, str(FEDERATION), "up", "--root", str(tmp_path)],
                            capture_output=True, text=True, env=clean_env(), timeout=60)
    assert result.returncode != 0
    assert "already holds a federation" in result.stderr
