"""A hub on PostgreSQL, and two hub processes sharing one PostgreSQL database: real
daemons, a real spoke, real agent processes. Skipped, saying how to run them, without a
server (FLEETWIRE_TEST_POSTGRES_URL)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from hub.client import HubClient
from hub.demo import FLEETWIRE, Daemon
from shared.errors import NotFound
from shared.pb.v1 import operator_pb2, wire_pb2
from shared.scope import Role
from tests.conftest import Federation, build_federation
from tests.databases import create_database, drop_database, postgres_url
from tests.unit.test_migrations import script_head


@dataclass
class TwoHubs:
    federation: Federation
    second: Daemon  # the same hub instance (home, keys), its own process and ports
    database_url: str

    @property
    def first(self) -> Daemon:
        return self.federation.hub


@pytest.fixture(scope="module")
def two_hubs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHubs]:
    url = asyncio.run(create_database(postgres_url()))
    try:
        for federation in build_federation(tmp_path_factory.mktemp("pg-fed"), url):
            second = federation.fed.start("hub", federation.hub.name, "127.0.0.1:0",
                                          "--peer-listen", "127.0.0.1:0")
            yield TwoHubs(federation, second, url)
    finally:
        asyncio.run(drop_database(url))


def fleetwire(*args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
    """The real command line, in its own process (so calls can truly run at once)."""
    return subprocess.run([*FLEETWIRE, *args], capture_output=True, text=True, timeout=90,
                          env={**os.environ, **(env or {})})


def through(hub: Daemon, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    return fleetwire(*args, env={"FLEETWIRE_HUB": hub.address, "FLEETWIRE_TOKEN": token})


def ok_json(result: subprocess.CompletedProcess[str]) -> object:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_the_hub_runs_on_postgres(two_hubs: TwoHubs) -> None:
    home = two_hubs.federation.home(two_hubs.first.name)
    shown = fleetwire("config", "show", "--home", str(home), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["database"]["url"]["value"].startswith("postgresql+asyncpg://")
    # Nothing was written to the SQLite file init made: the hub's tenants are in
    # PostgreSQL (the CLI, --home, reads them there too).
    tenants = fleetwire("tenant", "list", "--home", str(home), "--json")
    assert tenants.returncode == 0, tenants.stderr
    assert {"acme", "globex"} <= {t["tenant"] for t in json.loads(tenants.stdout)}


def test_an_agent_spawned_through_one_hub_is_seen_and_killed_through_the_other(
        two_hubs: TwoHubs) -> None:
    token = two_hubs.federation.tokens["acme"]
    spawned = ok_json(through(two_hubs.first, token, "agent", "spawn", "--spoke", "spoke-a",
                              "--workspace", "research", "--template", "sleeper",
                              "--task", "pg", "--json"))
    agent_id = spawned["agent_id"]  # type: ignore[index]
    status = ok_json(through(two_hubs.second, token, "agent", "status", agent_id, "--json"))
    assert status["state"] == "RUNNING"  # type: ignore[index]
    killed = ok_json(through(two_hubs.second, token, "agent", "kill", agent_id, "--json"))
    assert killed["state"] == "KILLED"  # type: ignore[index]
    listed = ok_json(through(two_hubs.first, token, "agent", "list", "--json"))
    assert {a["agent_id"]: a["state"] for a in listed}[agent_id] == "KILLED"  # type: ignore[union-attr,index]


def test_a_spoke_on_postgres_spawns_and_kills(two_hubs: TwoHubs) -> None:
    """A spoke may use PostgreSQL too (its own database): agents, workspaces, grants,
    replay memory and outbox all live there."""
    federation = two_hubs.federation
    url = asyncio.run(create_database(postgres_url()))
    try:
        federation.add_spoke("spoke-pg", tenants={"acme": ["research"]}, database_url=url)
        token = federation.tokens["acme"]
        spawned = ok_json(through(two_hubs.first, token, "agent", "spawn", "--spoke",
                                  "spoke-pg", "--workspace", "research", "--template",
                                  "sleeper", "--task", "pg-spoke", "--json"))
        agent_id = spawned["agent_id"]  # type: ignore[index]
        live = ok_json(through(two_hubs.second, token, "agent", "status", agent_id,
                               "--live", "--json"))
        assert live["state"] == "RUNNING"  # type: ignore[index]
        killed = ok_json(through(two_hubs.first, token, "agent", "kill", agent_id, "--json"))
        assert killed["state"] == "KILLED"  # type: ignore[index]
        verify = fleetwire("audit", "verify", "--home", str(federation.home("spoke-pg")))
        assert verify.returncode == 0, verify.stderr
    finally:
        spoke = federation.spokes.pop("spoke-pg", None)
        if spoke is not None:
            spoke.stop()
        asyncio.run(drop_database(url))


async def test_two_hubs_rotating_the_same_token_at_once_rotate_it_once(
        two_hubs: TwoHubs) -> None:
    """Each round, six rotations of the same token reach the two hub processes at the
    same moment (three each, over open channels); exactly one succeeds, the others
    answer NOT_FOUND, never a second replacement, and the audit chain both processes
    wrote stays intact."""
    fed = two_hubs.federation
    admin = fed.tokens["acme-admin"]
    await asyncio.to_thread(fed.token, "acme", principal="rota", role="operator")
    async with HubClient(two_hubs.first.address, admin) as first, \
            HubClient(two_hubs.second.address, admin) as second:
        listed = await first.list_tokens()
        (target_id,) = [t.id for t in listed.tokens if t.principal == "rota"]
        rounds = 4
        for _ in range(rounds):
            results = await asyncio.gather(
                *(client.rotate_token(target_id, 1) for client in (first, second) * 3),
                return_exceptions=True)
            wins = [r for r in results if isinstance(r, operator_pb2.IssuedToken)]
            losses = [r for r in results if not isinstance(r, operator_pb2.IssuedToken)]
            assert len(wins) == 1, results
            assert [type(e) for e in losses] == [NotFound] * 5, losses
            target_id = wins[0].id
        tokens = [t for t in (await second.list_tokens()).tokens if t.principal == "rota"]
    # One chain: every token but the newest was replaced, each by a different one.
    assert len(tokens) == rounds + 1
    replaced = [t.replaced_by_id for t in tokens if t.replaced_by_id]
    assert len(replaced) == len(set(replaced)) == rounds
    verify = await asyncio.to_thread(fleetwire, "audit", "verify", "--home",
                                     str(fed.home(two_hubs.first.name)))
    assert verify.returncode == 0, verify.stderr


async def test_two_hubs_writing_at_once_keep_one_audit_chain_and_the_token_limit(
        two_hubs: TwoHubs) -> None:
    """Twelve token creations for one principal through both processes at once: the
    three-working-tokens limit holds across them, and the audit chain stays one."""
    fed = two_hubs.federation
    home = fed.home(two_hubs.first.name)
    admin = fed.tokens["acme-admin"]
    async with HubClient(two_hubs.first.address, admin) as first, \
            HubClient(two_hubs.second.address, admin) as second:
        issued = await asyncio.gather(*(client.create_token("many", Role.OPERATOR)
                                        for client in (first, second) * 6))
        tokens = (await first.list_tokens()).tokens
    assert len({i.id for i in issued}) == 12
    working = [t for t in tokens if t.principal == "many" and t.state == "active"]
    assert len(working) == 3
    records = ok_json(await asyncio.to_thread(fleetwire, "audit", "list", "--home",
                                              str(home), "--json"))
    assert sum(r["action"] == "token.create" and "many" in r["reason"]
               for r in records) == 12  # type: ignore[union-attr,index]
    verify = await asyncio.to_thread(fleetwire, "audit", "verify", "--home", str(home))
    assert verify.returncode == 0, verify.stderr


async def test_two_hubs_spawning_killing_and_issuing_at_once_keep_one_audit_chain(
        two_hubs: TwoHubs) -> None:
    """Spawns, kills and token creations through both processes at once: the registry's
    Core transactions (ADR 0020) and the token sessions all take the chain's lock first,
    so nothing deadlocks and the chain stays one."""
    fed = two_hubs.federation
    token, admin = fed.tokens["acme"], fed.tokens["acme-admin"]
    async with HubClient(two_hubs.first.address, token) as first, \
            HubClient(two_hubs.second.address, token) as second, \
            HubClient(two_hubs.first.address, admin) as first_admin, \
            HubClient(two_hubs.second.address, admin) as second_admin:
        async def spawn(client: HubClient) -> str:
            agent = await client.spawn(spoke="spoke-a", workspace="research",
                                       template="sleeper", task="at-once", params={})
            return agent.agent_id

        made = await asyncio.wait_for(asyncio.gather(
            *(spawn(client) for client in (first, second) * 6),
            *(client.create_token(f"at-once-{n}", Role.VIEWER)
              for n, client in enumerate((first_admin, second_admin) * 2))), 60)
        agent_ids = [m for m in made if isinstance(m, str)]
        assert len(set(agent_ids)) == 12
        # Each killed through the hub it was not spawned through.
        killed = await asyncio.wait_for(asyncio.gather(*(
            (second if n % 2 == 0 else first).kill(agent_id)
            for n, agent_id in enumerate(agent_ids))), 60)
    assert {k.state for k in killed} == {wire_pb2.AGENT_STATE_KILLED}
    verify = await asyncio.to_thread(fleetwire, "audit", "verify", "--home",
                                     str(fed.home(two_hubs.first.name)))
    assert verify.returncode == 0, verify.stderr


def test_two_hubs_starting_at_once_on_a_new_database_both_migrate_it(
        two_hubs: TwoHubs, tmp_path: Path) -> None:
    """The migrations take a database lock: two hubs started together on an empty
    PostgreSQL database both come up, and the schema is made once."""
    fed = two_hubs.federation.fed
    url = asyncio.run(create_database(postgres_url()))
    try:
        home = fed.init("hub-fresh")
        with open(home / "config.toml", "a") as f:
            f.write(f'\n[database]\nurl = "{url}"\n')
        with ThreadPoolExecutor(2) as pool:
            daemons = list(pool.map(
                lambda _: fed.start("hub", "hub-fresh", "127.0.0.1:0",
                                    "--peer-listen", "127.0.0.1:0"), range(2)))
        assert all(d.proc.poll() is None for d in daemons)
        migrated = fleetwire("migrate", "--home", str(home))
        assert migrated.returncode == 0, migrated.stderr
        assert f"at schema {script_head()}" in migrated.stdout
        for daemon in daemons:
            assert daemon.stop() == 0
    finally:
        asyncio.run(drop_database(url))
