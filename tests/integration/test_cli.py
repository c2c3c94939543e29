"""The `fleetwire` program as a person runs it: JSON shapes and docs/design.md's exit codes."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Federation
from tests.integration.helpers import processes_with_marker

AGENT_KEYS = {"agent_id", "spoke", "tenant", "workspace", "template", "state", "exit_code",
              "started_at", "ended_at"}


def fleetwire(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWIRE_")}
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True,
                          text=True, env={**clean, **(env or {})}, timeout=120)


def test_agent_commands_print_json_and_exit_zero(federation: Federation) -> None:
    env = federation.agent_env("acme")
    spawned = fleetwire("agent", "spawn", "--spoke", "spoke-b", "--workspace", "research",
                        "--template", "sleeper", "--task", "cli", "--json", env=env)
    assert spawned.returncode == 0, spawned.stderr
    agent = json.loads(spawned.stdout)
    assert set(agent) >= AGENT_KEYS and agent["state"] == "RUNNING"
    assert agent["exit_code"] is None and agent["started_at"] and agent["ended_at"] is None

    status = json.loads(fleetwire("agent", "status", agent["agent_id"], "--json",
                                  env=env).stdout)
    assert status["agent_id"] == agent["agent_id"] and status["spoke"] == "spoke-b"

    listed = json.loads(fleetwire("agent", "list", "--spoke", "spoke-b", "--workspace",
                                  "research", "--json", env=env).stdout)
    assert isinstance(listed, list) and agent["agent_id"] in {a["agent_id"] for a in listed}
    assert all(set(a) >= AGENT_KEYS for a in listed)

    # Flags win over the environment.
    killed = fleetwire("agent", "kill", agent["agent_id"], "--grace", "2", "--json",
                       "--hub", federation.hub.address, "--token", federation.tokens["acme"],
                       env={"FLEETWIRE_HUB": "127.0.0.1:1", "FLEETWIRE_TOKEN": "fwt_bad"})
    assert killed.returncode == 0, killed.stderr
    final = json.loads(killed.stdout)
    assert final["state"] == "KILLED" and final["ended_at"]
    assert processes_with_marker(agent["agent_id"]) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(("case", "code", "needle"), [
    ("unknown agent", 3, "not found"),
    ("missing workspace", 3, "workspace 'nope' not found"),
    ("unknown template", 2, "unknown template 'nope'"),
    ("viewer spawns", 4, "may not spawn"),
    ("bad token", 5, "not valid"),
    ("malformed token", 5, "malformed"),
    ("no token", 2, "no operator token"),
    ("no hub", 2, "no hub address"),
    ("malformed hub address", 2, "not HOST:PORT"),
    ("spoke address as hub", 2, "speaks TLS"),
    ("nothing listening", 7, "cannot reach"),
    ("token in plaintext off loopback", 2, "refusing to send an operator token in plaintext"),
])
def test_refusals_exit_with_design_codes(federation: Federation, case: str, code: int,
                                         needle: str) -> None:
    hub, tok = federation.hub.address, federation.tokens["acme"]
    spawn = ["agent", "spawn", "--spoke", "spoke-a", "--workspace", "research",
             "--template", "sleeper"]
    args, env = {
        "unknown agent": (["agent", "status", "0" * 32], {}),
        "missing workspace": ([*spawn[:4], "--workspace", "nope", "--template", "sleeper"], {}),
        "unknown template": ([*spawn[:6], "--template", "nope"], {}),
        "viewer spawns": (spawn, {"FLEETWIRE_TOKEN": federation.tokens["acme-viewer"]}),
        "bad token": (["agent", "list"], {"FLEETWIRE_TOKEN": "fwt_" + "A" * 43}),
        "malformed token": (["agent", "list"], {"FLEETWIRE_TOKEN": "hunter2"}),
        "no token": (["agent", "list"], {"FLEETWIRE_TOKEN": ""}),
        "no hub": (["agent", "list"], {"FLEETWIRE_HUB": ""}),
        "malformed hub address": (["agent", "list"], {"FLEETWIRE_HUB": "localhost"}),
        "spoke address as hub": (["agent", "list"],
                                 {"FLEETWIRE_HUB": federation.spokes["spoke-a"].address}),
        "nothing listening": (["agent", "list"], {"FLEETWIRE_HUB": f"127.0.0.1:{_free_port()}"}),
        # Refused before any connection is tried: nothing leaves this machine.
        "token in plaintext off loopback": (["agent", "list"],
                                            {"FLEETWIRE_HUB": "192.0.2.1:7400"}),
    }[case]
    result = fleetwire(*args, env={"FLEETWIRE_HUB": hub, "FLEETWIRE_TOKEN": tok, **env})
    assert result.returncode == code, (result.stdout, result.stderr)
    assert needle in result.stderr
    assert "Traceback" not in result.stderr


def test_hub_still_serves_after_the_refusals(federation: Federation) -> None:
    ok = fleetwire("agent", "list", env=federation.agent_env("acme"))
    assert ok.returncode == 0, ok.stderr
    assert federation.hub.proc.poll() is None
    assert all(d.proc.poll() is None for d in federation.spokes.values())


def test_init_identity_and_local_admin_commands(tmp_path: Path) -> None:
    home = tmp_path / "node"
    assert fleetwire("init", "--home", str(home), "--name", "node-1").returncode == 0
    assert stat.S_IMODE((home / "identity.key").stat().st_mode) == 0o600
    assert (home / "state.db").exists() and (home / "config.toml").exists()
    shown = json.loads(fleetwire("identity", "show", "--home", str(home), "--json").stdout)
    assert set(shown) == {"name", "key_id", "public_key", "tls_cert", "tls_fingerprint",
                          "isolation"}
    assert shown["isolation"] in ("full", "namespaces")
    assert shown["name"] == "node-1" and shown["tls_fingerprint"].startswith("sha256:")
    assert stat.S_IMODE((home / "tls.key").stat().st_mode) == 0o600
    assert len(shown["key_id"]) == 16

    again = fleetwire("init", "--home", str(home), "--name", "node-1")
    assert again.returncode == 2 and "already holds an instance" in again.stderr
    bad_key = fleetwire("peer", "add", "--home", str(home), "--name", "x",
                        "--public-key", "bm90IGEga2V5")
    assert bad_key.returncode == 2 and "32 raw bytes" in bad_key.stderr
    assert fleetwire("tenant", "create", "--home", str(home), "acme").returncode == 0
    dup = fleetwire("tenant", "create", "--home", str(home), "acme")
    assert dup.returncode == 2 and "already exists" in dup.stderr
    bad_slug = fleetwire("tenant", "create", "--home", str(home), "Not_A_Slug")
    assert bad_slug.returncode == 2 and "not a valid slug" in bad_slug.stderr
    no_tenant = fleetwire("workspace", "create", "--home", str(home), "--tenant", "nope", "w")
    assert no_tenant.returncode == 3
    no_peer = fleetwire("grant", "add", "--home", str(home), "--peer", "hub", "--tenant", "acme")
    assert no_peer.returncode == 3 and "peer 'hub' not found" in no_peer.stderr
    no_tok = fleetwire("token", "create", "--home", str(home), "--tenant", "nope")
    assert no_tok.returncode == 3

    tok = json.loads(fleetwire("token", "create", "--home", str(home), "--tenant", "acme",
                               "--json").stdout)["token"]
    # Stored hashed: the plain token is nowhere in the database file.
    assert tok.encode() not in (home / "state.db").read_bytes()

    # A key file others can read is refused, and the message says how to fix it.
    (home / "identity.key").chmod(0o644)
    loose = fleetwire("identity", "show", "--home", str(home))
    assert loose.returncode == 2 and "chmod 600" in loose.stderr


def test_daemon_refuses_bad_config_at_start(tmp_path: Path) -> None:
    home = tmp_path / "node"
    assert fleetwire("init", "--home", str(home), "--name", "node-1").returncode == 0
    config = home / "config.toml"
    config.write_text(config.read_text().replace("max_grace_seconds", "max_grace_secs"))
    result = fleetwire("spoke", "run", "--home", str(home), "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert "spoke.max_grace_secs: unknown key" in result.stderr
