"""Idempotency keys on the operator calls that create or change something: the same key
and request again get the first answer (a retried spawn never makes a second agent),
another request under a used key is refused, a refusal is kept, a failure a retry may
not meet lets the key go, and a new token's secret is never kept."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from hub.client import HubClient
from shared.errors import InvalidArgument, NotFound, Unavailable
from shared.scope import Role
from tests.conftest import Federation, build_federation
from tests.integration.helpers import eventually, processes_with_marker, state


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    yield from build_federation(tmp_path_factory.mktemp("idempotency"))


def keyed(fed: Federation, key: str, token: str = "acme") -> HubClient:
    return HubClient(fed.hub.address, fed.tokens[token], idempotency_key=key)


async def spawn(hub: HubClient, spoke: str = "spoke-a", task: str = "") -> object:
    return await hub.spawn(spoke=spoke, workspace="research", template="sleeper", task=task,
                           params={})


async def test_the_same_spawn_with_the_same_key_makes_one_agent(fed: Federation) -> None:
    async with keyed(fed, "spawn-once-1") as hub:
        first = await spawn(hub, task="once")
        again = await spawn(hub, task="once")
        assert again.agent_id == first.agent_id  # type: ignore[attr-defined]
        assert len(processes_with_marker(first.agent_id)) == 1  # type: ignore[attr-defined]
        with pytest.raises(InvalidArgument, match="idempotency key 'spawn-once-1' was used "
                                                  "for another request"):
            await spawn(hub, task="another task")
    # Another key is another request.
    async with keyed(fed, "spawn-once-2") as hub:
        other = await spawn(hub, task="once")
        assert other.agent_id != first.agent_id  # type: ignore[attr-defined]
    async with keyed(fed, "") as hub:
        for agent in (first, other):
            assert state(await hub.kill(agent.agent_id, grace_ms=2000)) == "KILLED"  # type: ignore[attr-defined]


async def test_a_kill_again_under_its_key_answers_as_the_first(fed: Federation) -> None:
    async with keyed(fed, "spawn-to-kill") as hub:
        agent = await spawn(hub)
    async with keyed(fed, "kill-1") as hub:
        first = await hub.kill(agent.agent_id, grace_ms=1000)  # type: ignore[attr-defined]
        again = await hub.kill(agent.agent_id, grace_ms=1000)  # type: ignore[attr-defined]
    assert first == again and state(first) == "KILLED"


async def test_a_refusal_is_kept_and_a_key_is_per_caller(fed: Federation) -> None:
    async with keyed(fed, "refused-1") as hub:
        for _ in range(2):
            with pytest.raises(NotFound, match="spoke 'nowhere' not found"):
                await spawn(hub, spoke="nowhere")
    # The same key from another principal is another request.
    async with keyed(fed, "refused-1", token="acme-bob") as hub:
        agent = await spawn(hub)
        assert state(agent) == "RUNNING"
    async with keyed(fed, "", token="acme-bob") as hub:
        await hub.kill(agent.agent_id, grace_ms=1000)  # type: ignore[attr-defined]


async def test_a_failure_a_retry_may_not_meet_lets_the_key_go(fed: Federation) -> None:
    """The spoke is down: the spawn fails (UNAVAILABLE) and its key is free again; the
    retry, when the spoke is back, starts the agent the first try would have."""
    old = fed.spokes["spoke-b"]
    async with keyed(fed, "while-down") as hub:
        async def status_is(wanted: str) -> bool:
            found = {s.name: s.status for s in (await hub.spokes()).spokes}
            return found.get("spoke-b") == wanted

        await eventually(lambda: status_is("ONLINE"), what="spoke-b to be ONLINE")
        await asyncio.to_thread(old.stop)
        await eventually(lambda: status_is("OFFLINE"), what="spoke-b to be OFFLINE")
        with pytest.raises(Unavailable):
            await spawn(hub, spoke="spoke-b")
        fed.spokes["spoke-b"] = await asyncio.to_thread(fed.fed.start, "spoke", "spoke-b",
                                                        old.address)

        async def spawned() -> bool:
            try:
                return state(await spawn(hub, spoke="spoke-b")) == "RUNNING"
            except Unavailable:
                return False

        await eventually(spawned, what="the retried spawn to run once spoke-b is back")
        agent = await spawn(hub, spoke="spoke-b")
        assert len(processes_with_marker(agent.agent_id)) == 1  # type: ignore[attr-defined]
    async with keyed(fed, "") as hub:
        await hub.kill(agent.agent_id, grace_ms=1000)  # type: ignore[attr-defined]


async def test_a_new_tokens_secret_is_never_kept(fed: Federation) -> None:
    async with keyed(fed, "token-1", token="acme-admin") as hub:
        issued = await hub.create_token("carol", Role.OPERATOR)
        with pytest.raises(InvalidArgument, match="held a token, which is shown only once"):
            await hub.create_token("carol", Role.OPERATOR)
    db = (fed.home(fed.hub.name) / "state.db").read_bytes()
    assert issued.token.encode() not in db


def test_the_command_line_takes_a_key_and_refuses_a_malformed_one(fed: Federation) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETWIRE_")}
    env.update(fed.agent_env("acme"))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=env,
                              capture_output=True, text=True, timeout=120)

    spawn_args = ("agent", "spawn", "--spoke", "spoke-a", "--workspace", "research",
                  "--template", "sleeper", "--json", "--idempotency-key", "cli-1")
    first, again = cli(*spawn_args), cli(*spawn_args)
    assert first.returncode == again.returncode == 0, first.stderr + again.stderr
    assert json.loads(first.stdout)["agent_id"] == json.loads(again.stdout)["agent_id"]
    bad = cli("agent", "spawn", "--spoke", "spoke-a", "--workspace", "research",
              "--template", "sleeper", "--idempotency-key", "not a key!")
    assert bad.returncode == 2 and "idempotency key must be 1 to 128" in bad.stderr
    assert cli("agent", "kill", json.loads(first.stdout)["agent_id"]).returncode == 0
