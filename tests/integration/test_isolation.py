"""What an agent can and cannot reach, tried by a hostile tenant with real processes.

A spoke runs the template every agent-orchestration spoke has, `{python} -c {task}`: the
tenant supplies the code. A globex agent then tries what an attacker would against the
spoke (its keys, current and retired, its database and journal, its config) and against
an acme agent on the same spoke (its log, its working folder, its processes). Every
attempt must fail, the acme agent must keep running, and its log must still reach acme.

Three spokes: one run as root (isolation "full": each agent its own uid and namespaces),
one run by a plain user (isolation "namespaces": a user namespace under the spoke's uid),
and one run by a plain user where the kernel refuses user namespaces (it must refuse to
start agents, unless told isolation = "none").
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub.client import HubClient
from shared.errors import InvalidArgument
from shared.rotation import RETIRED_DIR
from spoke.shim import SUPERVISOR_FILE, read_json
from tests.conftest import Federation, build_federation
from tests.integration.helpers import eventually, processes_with_marker, state

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="makes a plain user's spoke")

AS_PLAIN_USER = Path(__file__).with_name("as_plain_user.py")
PLAIN = 65534
TEMPLATES = '''
[templates.python]
argv = ["{python}", "-c", "{task}"]
grace_seconds = 1

[templates.offline]
argv = ["{python}", "-c", "{task}"]
network = "none"

[templates.needs-full]
argv = ["{python}", "-c", "{task}"]
isolation = "full"
'''

VICTIM = textwrap.dedent("""
    import pathlib, time
    pathlib.Path("secret.txt").write_text("acme-secret")
    pathlib.Path("/tmp/acme-tmp-secret").write_text("acme-secret")
    n = 0
    while True:
        print(f"acme log line {n}", flush=True)
        n += 1
        time.sleep(0.2)
""")

# The attacker's code: every attempt is recorded as what happened.
ATTACK = textwrap.dedent("""
    import ctypes, json, os, signal
    T = json.loads({targets!r})
    libc = ctypes.CDLL(None, use_errno=True)
    out = {{}}
    def attempt(name, act):
        try:
            act()
            out[name] = "DONE"
        except Exception as exc:
            out[name] = "refused: " + type(exc).__name__
    def ptrace(pid):
        if libc.ptrace(16, pid, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "ptrace")
    for p in T["read"]:
        attempt("read " + p, lambda p=p: open(p, "rb").read(1))
    for p in T["write"]:
        attempt("write " + p, lambda p=p: open(p, "r+b").close())
    for p in T["list"]:
        attempt("list " + p, lambda p=p: os.listdir(p))
    out["home"] = sorted(os.listdir(T["home"]))
    attempt("plant", lambda: open(T["plant"], "w").close())
    for pid in T["pids"]:
        attempt(f"environ {{pid}}", lambda pid=pid: open(f"/proc/{{pid}}/environ", "rb").read())
        attempt(f"cmdline {{pid}}", lambda pid=pid: open(f"/proc/{{pid}}/cmdline", "rb").read())
        attempt(f"ptrace {{pid}}", lambda pid=pid: ptrace(pid))
        attempt(f"kill {{pid}}", lambda pid=pid: os.kill(pid, signal.SIGKILL))
    out["tmp"] = sorted(os.listdir("/tmp"))
    out["pids"] = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    print("RESULT " + json.dumps(out), flush=True)
""")

# What an agent is, as it sees itself.
SELF = textwrap.dedent("""
    import json, os
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    st = os.stat(".")
    print("SELF " + json.dumps({
        "uid": os.getuid(), "gid": os.getgid(), "groups": status["Groups"].split(),
        "no_new_privs": status["NoNewPrivs"].strip(), "cap_eff": status["CapEff"].strip(),
        "workdir_owner": st.st_uid, "workdir_mode": oct(st.st_mode & 0o777),
        "env": sorted(os.environ), "pid": os.getpid(), "ppid": os.getppid(),
        "home_visible": sorted(os.listdir(os.environ["SPOKE_HOME"]))
            if os.path.exists(os.environ["SPOKE_HOME"]) else None,
    }), flush=True)
""")


@pytest.fixture(scope="module")
def fed() -> Iterator[Federation]:
    # Under /tmp itself: a plain user's spoke must reach its home (pytest's own temporary
    # folders are root's alone).
    root = Path(tempfile.mkdtemp(prefix="fleetwire-isolation-"))
    root.chmod(0o755)
    try:
        for f in build_federation(root):
            f.add_spoke("spoke-root", tenants={"acme": ["research"], "globex": ["ops"]},
                        start=False)
            _with_templates(f, "spoke-root")
            # Retired keys too: an agent must reach none of the spoke's keys.
            f.fed.cli("identity", "rotate", "--home", str(f.home("spoke-root")))
            _start(f, "spoke-root")
            for name, wrapper in (("spoke-user", ("--",)), ("spoke-nons", ("--no-userns", "--"))):
                f.add_spoke(name, tenants={"acme": ["research"], "globex": ["ops"]},
                            start=False)
                _with_templates(f, name)
                f.fed.cli("identity", "rotate", "--home", str(f.home(name)))
                shutil.chown(f.home(name), PLAIN, PLAIN)
                for path in f.home(name).rglob("*"):
                    os.chown(path, PLAIN, PLAIN, follow_symlinks=False)
                _start(f, name, wrapper=(sys.executable, str(AS_PLAIN_USER), *wrapper))
            yield f
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _with_templates(f: Federation, spoke: str) -> None:
    with open(f.home(spoke) / "config.toml", "a") as cfg:
        cfg.write(TEMPLATES)


def _start(f: Federation, spoke: str, wrapper: tuple[str, ...] = ()) -> None:
    daemon = f.fed.start("spoke", spoke, wrapper=wrapper)
    f.fed.trust(f.hub.name, spoke, address=daemon.address)
    f.spokes[spoke] = daemon


def acme(f: Federation) -> HubClient:
    return HubClient(f.hub.address, f.tokens["acme"])


def globex(f: Federation) -> HubClient:
    return HubClient(f.hub.address, f.tokens["globex"])


async def printed(hub: HubClient, agent_id: str, prefix: str) -> dict[str, object]:
    """The JSON an agent printed after prefix, once it has."""
    found: dict[str, object] = {}

    async def done() -> bool:
        text = (await hub.logs(agent_id, tail_lines=1000)).text
        line = next((x for x in text.splitlines() if x.startswith(prefix + " ")), None)
        if line is not None:
            found.update(json.loads(line[len(prefix) + 1:]))
        return line is not None

    await eventually(done, timeout=30, what=f"the agent to print {prefix}")
    return found


@pytest.mark.parametrize("spoke", ["spoke-root", "spoke-user"])
async def test_a_hostile_tenant_reaches_nothing_of_the_spoke_or_another_tenant(
        fed: Federation, spoke: str) -> None:
    home = fed.home(spoke)
    async with acme(fed) as owner, globex(fed) as attacker:
        victim = await owner.spawn(spoke=spoke, workspace="research", template="python",
                                   task=VICTIM, params={})
        victim_dir = fed.agent_workdir(spoke, "acme", "research", victim.agent_id)
        await eventually(lambda: (victim_dir / "secret.txt").exists(), what="the victim")
        victim_log = home / "workspaces" / "acme" / "research" / "logs" / f"{victim.agent_id}.log"
        keys = [home / "identity.key", home / "tls.key", *sorted((home / RETIRED_DIR).glob("*"))]
        supervisor = read_json(home / "run" / victim.agent_id / SUPERVISOR_FILE) or {}
        assert int(str(supervisor.get("pid", 0))) > 1
        targets = {
            "read": [str(p) for p in (*keys, home / "state.db", home / "state.db-wal",
                                      home / "state.db-shm", home / "config.toml",
                                      victim_log, victim_dir / "secret.txt",
                                      home / "run" / victim.agent_id / SUPERVISOR_FILE)],
            "write": [str(home / "state.db"), str(victim_log), str(victim_dir / "secret.txt")],
            "list": [str(victim_dir), str(home / "workspaces" / "acme"),
                     str(home / "run"), str(home / RETIRED_DIR)],
            "home": str(home),
            "plant": str(victim_dir / "planted"),
            "pids": [*processes_with_marker(victim.agent_id), supervisor.get("pid", 0)],
        }
        assert len(keys) >= 3 and _all_exist(targets["read"])
        attack = await attacker.spawn(spoke=spoke, workspace="ops", template="python",
                                      task=ATTACK.format(targets=json.dumps(targets)),
                                      params={})
        result = await printed(attacker, attack.agent_id, "RESULT")

        tried = {k: v for k, v in result.items() if k not in ("tmp", "pids", "home")}
        succeeded = {k: v for k, v in tried.items() if not str(v).startswith("refused")}
        assert tried and not succeeded, succeeded
        # It sees its own PID namespace only (its init and itself), no other agent's /tmp,
        # and of the spoke's home only the way to its own folder.
        assert len(result["pids"]) == 2, result  # type: ignore[arg-type]
        assert "acme-tmp-secret" not in result["tmp"], result  # type: ignore[operator]
        assert result["home"] == ["workspaces"], result

        # The victim was not touched and its tenant still gets its log.
        assert state(await owner.status(victim.agent_id, live=True)) == "RUNNING"
        before = (await owner.logs(victim.agent_id)).text.count("acme log line")
        await eventually(lambda: _more_lines(owner, victim.agent_id, before),
                         what="the victim's log to grow")
        assert (victim_dir / "secret.txt").read_text() == "acme-secret"
        assert not (victim_dir / "planted").exists()
        await owner.kill(victim.agent_id, grace_ms=1000)
        assert processes_with_marker(victim.agent_id) == []


def _all_exist(paths: list[str]) -> bool:
    return all(os.path.exists(p) for p in paths)


async def _more_lines(hub: HubClient, agent_id: str, before: int) -> bool:
    return (await hub.logs(agent_id, tail_lines=1000)).text.count("acme log line") > before


@pytest.mark.parametrize("spoke", ["spoke-root", "spoke-user"])
async def test_an_agent_runs_as_itself_with_nothing_more(fed: Federation, spoke: str) -> None:
    async with acme(fed) as hub:
        task = f"import os; os.environ['SPOKE_HOME'] = {str(fed.home(spoke))!r}\n" + SELF
        agent = await hub.spawn(spoke=spoke, workspace="research", template="python",
                                task=task, params={})
        seen = await printed(hub, agent.agent_id, "SELF")
    if spoke == "spoke-root":
        base = 1879048192
        assert base <= int(str(seen["uid"])) < base + 65536 and seen["gid"] == seen["uid"]
        assert seen["workdir_owner"] == seen["uid"]
    else:
        assert seen["uid"] == PLAIN
    assert seen["groups"] == []
    assert (seen["no_new_privs"], seen["cap_eff"]) == ("1", "0000000000000000")
    assert seen["workdir_mode"] == "0o700"
    # The spoke's home shows only the way to the agent's own folder.
    assert seen["home_visible"] == ["workspaces"]
    assert set(str(e) for e in seen["env"]) <= {  # type: ignore[union-attr]
        "PATH", "LANG", "LC_ALL", "TZ", "HOME", "PYTHONUNBUFFERED", "FLEETWIRE_AGENT_ID",
        "FLEETWIRE_TENANT", "FLEETWIRE_WORKSPACE", "FLEETWIRE_TASK", "FLEETWIRE_SPOKE",
        "SPOKE_HOME", "LC_CTYPE"}
    # PID 1 of its namespace is its init; it is PID 2.
    assert (seen["pid"], seen["ppid"]) == (2, 1)


async def test_kills_leave_nothing_of_an_agent_of_a_plain_users_spoke(fed: Federation) -> None:
    code = ("import os, signal, subprocess, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
            "print('up', flush=True)\ntime.sleep(600)")
    async with acme(fed) as hub:
        agent = await hub.spawn(spoke="spoke-user", workspace="research", template="python",
                                task=code, params={})
        await eventually(lambda: len(processes_with_marker(agent.agent_id)) == 2,
                         what="the agent and its escaped child")
        killed = await hub.kill(agent.agent_id, grace_ms=300)
    assert state(killed) == "KILLED" and "SIGKILL after the grace period" in killed.reason
    assert processes_with_marker(agent.agent_id) == []


async def test_network_none_leaves_an_agent_without_the_spokes_network(
        fed: Federation) -> None:
    hub_port = int(fed.hub.address.rsplit(":", 1)[1])
    code = ("import json, socket\ntry:\n"
            f"    socket.create_connection(('127.0.0.1', {hub_port}), timeout=2); r = 'reached'\n"
            "except OSError as e:\n    r = e.strerror\n"
            "print('NET ' + json.dumps({'hub': r, 'ifaces': [n for _, n in "
            "socket.if_nameindex()]}), flush=True)")
    async with acme(fed) as hub:
        for spoke in ("spoke-root", "spoke-user"):
            agent = await hub.spawn(spoke=spoke, workspace="research", template="offline",
                                    task=code, params={})
            seen = await printed(hub, agent.agent_id, "NET")
            assert seen == {"hub": "Connection refused", "ifaces": ["lo"]}, (spoke, seen)


async def test_isolation_is_shown_and_a_template_may_require_it(fed: Federation) -> None:
    async with acme(fed) as hub:
        async def shown() -> bool:
            spokes = {s.name: s.isolation for s in (await hub.spokes()).spokes}
            return (spokes.get("spoke-root"), spokes.get("spoke-user"),
                    spokes.get("spoke-nons")) == ("full", "namespaces", "unavailable")

        await eventually(shown, what="each spoke's isolation in `spoke list`")
        with pytest.raises(InvalidArgument, match="template 'needs-full' requires isolation "
                                                  "'full' and spoke 'spoke-user' provides "
                                                  "'namespaces'"):
            await hub.spawn(spoke="spoke-user", workspace="research", template="needs-full",
                            task="pass", params={})
        ran = await hub.spawn(spoke="spoke-root", workspace="research", template="needs-full",
                              task="print('ok')", params={})
        assert state(ran) in ("RUNNING", "SUCCEEDED")
    shown = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "shared.cli", "identity", "show", "--home",
                         str(fed.home("spoke-root")), "--json"],
        capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)["isolation"] == "full"


async def test_a_spoke_without_namespaces_refuses_agents_and_says_why(fed: Federation) -> None:
    log = (fed.home("spoke-nons") / "spoke.log").read_text()
    assert "AGENTS CANNOT START ON THIS SPOKE" in log
    async with acme(fed) as hub:
        with pytest.raises(InvalidArgument, match="spoke 'spoke-nons' cannot isolate agents: "
                                                  "this machine refuses the namespaces"):
            await hub.spawn(spoke="spoke-nons", workspace="research", template="python",
                            task="pass", params={})
        listed = await hub.list()
    assert not any(a.spoke == "spoke-nons" for a in listed.agents)


async def test_isolation_none_must_be_asked_for_and_is_said_loudly(fed: Federation) -> None:
    daemon = fed.spokes.pop("spoke-nons")
    await asyncio.to_thread(daemon.stop)
    started_ms = int(time.time() * 1000)
    cfg = fed.home("spoke-nons") / "config.toml"
    cfg.write_text(cfg.read_text().replace('isolation = "auto"', 'isolation = "none"'))
    fed.spokes["spoke-nons"] = await asyncio.to_thread(
        fed.fed.start, "spoke", "spoke-nons", daemon.address,
        wrapper=(sys.executable, str(AS_PLAIN_USER), "--no-userns", "--"))
    assert "ISOLATION IS OFF" in (fed.home("spoke-nons") / "spoke.log").read_text()
    async with acme(fed) as hub:
        async def online() -> bool:
            return any(s.name == "spoke-nons" and s.isolation == "none"
                       and s.last_heartbeat_ms >= started_ms for s in (await hub.spokes()).spokes)

        await eventually(online, what="spoke-nons ONLINE again, without isolation")
        agent = await hub.spawn(spoke="spoke-nons", workspace="research", template="python",
                                task="import os; print('uid', os.getuid())", params={})
        await eventually(lambda: _said(hub, agent.agent_id, f"uid {PLAIN}"),
                         what="the unisolated agent to run")


async def _said(hub: HubClient, agent_id: str, text: str) -> bool:
    return text in (await hub.logs(agent_id)).text
