"""Grants, quotas, token rotation and the audit trail, through real daemons."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator

import pytest

from hub.client import HubClient
from shared.errors import NotFound, ResourceExhausted, Unauthenticated
from tests.conftest import TEST_TEMPLATES, Federation, build_federation
from tests.integration.helpers import processes_with_marker, state


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    for f in build_federation(tmp_path_factory.mktemp("tenancy")):
        # spoke-q: workspace 'small' runs at most 2 agents; template 'solo' at most 1.
        home = f.fed.init("spoke-q")
        with open(home / "config.toml", "a") as cfg:
            cfg.write(TEST_TEMPLATES)
            cfg.write('\n[templates.solo]\nargv = ["{python}", "-m", "spoke.demo_agent", '
                      '"--steps", "100000", "--interval", "0.2"]\nmax_concurrent = 1\n')
        f.fed.cli("tenant", "create", "--home", str(home), "acme")
        f.fed.cli("workspace", "create", "--home", str(home), "--tenant", "acme", "small",
                  "--max-agents", "2")
        f.fed.cli("workspace", "create", "--home", str(home), "--tenant", "acme", "big")
        f.fed.trust("spoke-q", f.hub.name)
        f.fed.cli("grant", "add", "--home", str(home), "--peer", f.hub.name, "--tenant", "acme")
        daemon = f.fed.start("spoke", "spoke-q")
        f.fed.trust(f.hub.name, "spoke-q", address=daemon.address)
        f.spokes["spoke-q"] = daemon
        yield f


async def audit(fed: Federation, name: str, *args: str) -> tuple[int, str]:
    result = await asyncio.to_thread(fed.fed.cli, "audit", *args, "--home",
                                     str(fed.home(name)), check=False, show=False)
    return result.returncode, result.stdout + result.stderr


async def test_workspace_and_template_quotas(fed: Federation) -> None:
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        solo = await hub.spawn(spoke="spoke-q", workspace="big", template="solo",
                               task="", params={})
        with pytest.raises(ResourceExhausted) as err:
            await hub.spawn(spoke="spoke-q", workspace="big", template="solo",
                            task="", params={})
        assert "template 'solo'" in err.value.message and err.value.retry_after_ms > 0
        first = await hub.spawn(spoke="spoke-q", workspace="small", template="sleeper",
                                task="", params={})
        second = await hub.spawn(spoke="spoke-q", workspace="small", template="sleeper",
                                 task="", params={})
        before = {a.agent_id for a in (await hub.list(spoke="spoke-q")).agents}
        with pytest.raises(ResourceExhausted) as err:
            await hub.spawn(spoke="spoke-q", workspace="small", template="sleeper",
                            task="", params={})
        assert "workspace 'small' already runs 2 of at most 2" in err.value.message
        # No process was started and nothing was recorded for the refused spawn.
        assert {a.agent_id for a in (await hub.list(spoke="spoke-q")).agents} == before
        await hub.kill(first.agent_id, grace_ms=2000)
        third = await hub.spawn(spoke="spoke-q", workspace="small", template="sleeper",
                                task="room again", params={})
        assert state(third) == "RUNNING"
        for a in (solo, second, third):
            await hub.kill(a.agent_id, grace_ms=2000)


async def test_grant_revoke_takes_effect_on_the_next_command(fed: Federation) -> None:
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-b", workspace="lab", template="sleeper",
                                task="", params={})
        await asyncio.to_thread(fed.fed.cli, "grant", "revoke", "--home",
                                str(fed.home("spoke-b")), "--peer", fed.hub.name,
                                "--tenant", "acme")
        try:
            with pytest.raises(NotFound):
                await hub.status(agent.agent_id, live=True)
            with pytest.raises(NotFound):
                await hub.kill(agent.agent_id)
            assert processes_with_marker(agent.agent_id), "the refused kill did nothing"
        finally:
            await asyncio.to_thread(fed.fed.cli, "grant", "add", "--home",
                                    str(fed.home("spoke-b")), "--peer", fed.hub.name,
                                    "--tenant", "acme")
        assert state(await hub.kill(agent.agent_id, grace_ms=2000)) == "KILLED"


async def test_token_rotation_and_revocation_end_to_end(fed: Federation) -> None:
    hub_home = str(fed.home(fed.hub.name))
    made = json.loads((await asyncio.to_thread(
        fed.fed.cli, "token", "create", "--home", hub_home, "--tenant", "acme",
        "--principal", "rita", "--json")).stdout)
    rotated = json.loads((await asyncio.to_thread(
        fed.fed.cli, "token", "rotate", "--home", hub_home, str(made["id"]), "--grace", "1",
        "--json")).stdout)
    assert rotated["replaces"] == str(made["id"]) and rotated["principal"] == "rita"
    for token in (made["token"], rotated["token"]):
        async with HubClient(fed.hub.address, token) as hub:
            await hub.list(spoke="spoke-a")  # both work during the grace
    again = await asyncio.to_thread(fed.fed.cli, "token", "rotate", "--home", hub_home,
                                    str(made["id"]), check=False)
    assert again.returncode == 3 and "already rotated" in again.stderr
    await asyncio.to_thread(fed.fed.cli, "token", "revoke", "--home", hub_home,
                            str(made["id"]))
    async with HubClient(fed.hub.address, made["token"]) as hub:
        with pytest.raises(Unauthenticated):
            await hub.list(spoke="spoke-a")
    listed = json.loads((await asyncio.to_thread(
        fed.fed.cli, "token", "list", "--home", hub_home, "--tenant", "acme",
        "--json")).stdout)
    by_id = {t["id"]: t for t in listed}
    assert by_id[made["id"]]["state"] == "revoked"
    assert by_id[made["id"]]["replaced_by_id"] == rotated["id"]
    assert by_id[rotated["id"]]["state"] == "active"
    assert all("token" not in t and "token_sha256" not in t for t in listed)


async def test_every_change_and_refusal_is_audited_and_the_chain_verifies(
        fed: Federation) -> None:
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub, \
            HubClient(fed.hub.address, fed.tokens["globex"]) as globex:
        agent = await hub.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                                task="audited", params={})
        with pytest.raises(NotFound):
            await globex.kill(agent.agent_id)
        await hub.kill(agent.agent_id, grace_ms=2000)

    for name in (fed.hub.name, "spoke-a"):
        code, out = await audit(fed, name, "verify")
        assert code == 0 and "intact" in out, out
    _, out = await audit(fed, fed.hub.name, "list", "--json")
    hub_rows = [r for r in json.loads(out) if r["target"] == agent.agent_id]
    assert [(r["action"], r["outcome"], r["principal"], r["tenant"]) for r in hub_rows] == [
        ("agent.spawn", "allowed", "alice", "acme"),
        ("agent.kill", "refused", "gina", "globex"),
        ("agent.kill", "allowed", "alice", "acme")]
    refused = [r for r in json.loads(out) if r["outcome"] == "refused"
               and r["action"] == "agent.kill" and r["tenant"] == "globex"]
    assert refused and refused[-1]["reason"].startswith(f"agent '{agent.agent_id}' not found")
    _, out = await audit(fed, "spoke-a", "list", "--tenant", "acme", "--json")
    spoke_rows = [(r["action"], r["principal"]) for r in json.loads(out)
                  if r["target"] == agent.agent_id]
    assert spoke_rows == [("agent.spawn", "alice"), ("agent.start", ""),
                          ("agent.kill", "alice")]
    kill = next(r for r in json.loads(out) if r["target"] == agent.agent_id
                and r["action"] == "agent.kill")
    assert kill["message_id"] and kill["peer"] == fed.hub.name

    # Tampering with the spoke's trail is caught and the first bad record named.
    db = fed.home("spoke-a") / "state.db"
    with sqlite3.connect(db) as conn:
        seq = conn.execute("SELECT seq FROM audit_log WHERE target = ? AND action = "
                           "'agent.kill'", (agent.agent_id,)).fetchone()[0]
        conn.execute("UPDATE audit_log SET principal = 'mallory' WHERE seq = ?", (seq,))
    code, out = await audit(fed, "spoke-a", "verify")
    assert code == 1 and f"broken at record {seq}" in out
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE audit_log SET principal = 'alice' WHERE seq = ?", (seq,))
    assert (await audit(fed, "spoke-a", "verify"))[0] == 0


async def test_token_used_after_its_grace_is_refused_and_deactivated(fed: Federation) -> None:
    hub_home = fed.home(fed.hub.name)
    made = json.loads((await asyncio.to_thread(
        fed.fed.cli, "token", "create", "--home", str(hub_home), "--tenant", "acme",
        "--principal", "gus", "--json")).stdout)
    await asyncio.to_thread(fed.fed.cli, "token", "rotate", "--home", str(hub_home),
                            str(made["id"]), "--grace", "1")
    # Stand-in for an hour passing: move the grace end into the past.
    with sqlite3.connect(hub_home / "state.db") as conn:
        conn.execute("UPDATE operator_tokens SET expires_at_ms = 1 WHERE id = ?",
                     (made["id"],))
    async with HubClient(fed.hub.address, made["token"]) as hub:
        with pytest.raises(Unauthenticated) as err:
            await hub.list(spoke="spoke-a")
    assert "grace ended" in err.value.message
    with sqlite3.connect(hub_home / "state.db") as conn:
        revoked = conn.execute("SELECT revoked_at_ms FROM operator_tokens WHERE id = ?",
                               (made["id"],)).fetchone()[0]
    assert revoked is not None, "the expired token was deactivated when used"
