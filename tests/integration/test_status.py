"""Status flows from spokes to the hub on its own; liveness; nothing lost across restarts."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing

import pytest

from hub.client import HubClient
from shared.envelope import seal_envelope
from shared.errors import NotFound, Unavailable
from shared.identity import load_identity
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.scope import Role
from tests.conftest import TEST_OFFLINE_AFTER, Federation, build_federation
from tests.integration.helpers import eventually, processes_with_marker, state


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    yield from build_federation(tmp_path_factory.mktemp("status"))


def client(fed: Federation, token: str = "acme") -> HubClient:
    return HubClient(fed.hub.address, fed.tokens[token])


async def registry_state(hub: HubClient, agent_id: str) -> str:
    return state(await hub.status(agent_id))


def kill_marked(agent_id: str) -> None:
    for pid in processes_with_marker(agent_id):
        os.kill(pid, signal.SIGKILL)


def spoke_db_state(fed: Federation, spoke: str, agent_id: str) -> str:
    with sqlite3.connect(f"file:{fed.home(spoke) / 'state.db'}?mode=ro", uri=True) as conn:
        return str(conn.execute("SELECT state FROM agents WHERE agent_id = ?",
                                (agent_id,)).fetchone()[0])


async def test_reports_reach_the_registry_without_anyone_asking(fed: Federation) -> None:
    async with client(fed) as hub:
        agent = await hub.spawn(spoke="spoke-a", workspace="lab", template="exit-with",
                                task="", params={"code": "4"})
        await eventually(lambda: registry_state(hub, agent.agent_id), what="a report")

        async def failed() -> bool:
            return await registry_state(hub, agent.agent_id) == "FAILED"

        await eventually(failed, what="FAILED to be reported")
        known = await hub.status(agent.agent_id)
        assert known.exit_code == 4 and known.reported_at_ms > 0 and not known.stale
        assert known.seq >= 3  # spawned, started, exited

    # The hub applies a report before it answers, and the spoke deletes the entry only
    # once that signed Ack has reached it: the registry can show FAILED a moment before
    # the outbox is empty.
    def outbox_empty() -> bool:
        with closing(sqlite3.connect(fed.home("spoke-a") / "state.db")) as conn:
            left = conn.execute("SELECT count(*) FROM outbox WHERE agent_id = ?",
                                (agent.agent_id,)).fetchone()[0]
        return int(left) == 0

    await eventually(outbox_empty, what="acknowledged reports to leave the outbox")


async def test_reports_are_applied_once_and_in_order(fed: Federation) -> None:
    spoke = load_identity("spoke-a", fed.home("spoke-a") / "identity.key")
    async with client(fed) as hub:
        agent = await hub.spawn(spoke="spoke-a", workspace="lab", template="sleeper",
                                task="", params={})
        other = await hub.spawn(spoke="spoke-b", workspace="lab", template="sleeper",
                                task="", params={})
        current = await hub.status(agent.agent_id, live=True)

        async def report(*updates: tuple[wire_pb2.Agent, int]) -> None:
            signed = seal_envelope(spoke, recipient=fed.hub.name, report=wire_pb2.StatusReport(
                updates=[wire_pb2.AgentUpdate(agent=a, seq=s) for a, s in updates]))
            async with fed.peer_channel(spoke.name, fed.hub.name) as ch:
                reply = await wire_pb2_grpc.HubPeerServiceStub(ch).Deliver(signed, timeout=10)
            assert wire_pb2.Envelope.FromString(reply.envelope).response.HasField("ack")

        def as_state(a: wire_pb2.Agent, name: str) -> wire_pb2.Agent:
            b = wire_pb2.Agent()
            b.CopyFrom(a)
            b.state = wire_pb2.AgentState.Value(f"AGENT_STATE_{name}")
            b.spoke = ""
            return b

        await eventually(lambda: _seq_at_least(hub, agent.agent_id, current.seq),
                         what="the registry to catch up")
        # Late (older seq) and duplicate reports change nothing.
        await report((as_state(current, "PENDING"), 1), (as_state(current, "PENDING"), 1))
        assert await registry_state(hub, agent.agent_id) == "RUNNING"
        # A spoke cannot report on an agent that lives on another spoke.
        await report((as_state(other, "KILLED"), 99))
        assert await registry_state(hub, other.agent_id) == "RUNNING"
        # A newer seq is applied (here a forged-but-signed one from the right spoke).
        await report((as_state(current, "LOST"), current.seq + 50))
        assert await registry_state(hub, agent.agent_id) == "LOST"
        for a in (agent, other):
            await hub.kill(a.agent_id, grace_ms=2000)


async def test_a_live_answer_with_nothing_new_stamps_the_registry_afterwards(
        fed: Federation) -> None:
    """The last-heard time of a live answer that brings nothing newer is written in the
    background (with others of its moment), never lost, never moved back."""
    async with client(fed) as hub:
        agent = await hub.spawn(spoke="spoke-a", workspace="lab", template="sleeper",
                                task="", params={})

        async def running() -> bool:
            return await registry_state(hub, agent.agent_id) == "RUNNING"

        await eventually(running, what="RUNNING to be reported")
        before = (await hub.status(agent.agent_id)).reported_at_ms
        live = await hub.status(agent.agent_id, live=True)
        assert state(live) == "RUNNING" and live.spoke == "spoke-a"
        assert live.seq == (await hub.status(agent.agent_id)).seq

        async def stamped() -> bool:
            return (await hub.status(agent.agent_id)).reported_at_ms > before

        await eventually(stamped, what="the live answer's time in the registry")
        await hub.kill(agent.agent_id, grace_ms=2000)


async def _seq_at_least(hub: HubClient, agent_id: str, seq: int) -> bool:
    return (await hub.status(agent_id)).seq >= seq


async def test_hub_restart_loses_no_report(fed: Federation) -> None:
    async with client(fed) as hub:
        agents = [await hub.spawn(spoke="spoke-a", workspace="research", template="sleeper",
                                  task=str(i), params={}) for i in range(2)]
    old = fed.hub
    assert old.stop() == 0
    for a in agents:
        kill_marked(a.agent_id)
    await eventually(lambda: all(spoke_db_state(fed, "spoke-a", a.agent_id) == "FAILED"
                                 for a in agents), what="the spoke to record the deaths")
    fed.hub = await asyncio.to_thread(fed.fed.start, "hub", old.name, old.address,
                                    "--peer-listen", old.peer_address)
    async with client(fed) as hub:
        async def all_reported() -> bool:
            return all([await registry_state(hub, a.agent_id) == "FAILED" for a in agents])

        await eventually(all_reported, what="the outbox to deliver after the hub's return")
        assert "SIGKILL" in (await hub.status(agents[0].agent_id)).reason


async def test_silent_spoke_turns_offline_and_comes_back(fed: Federation) -> None:
    async with client(fed) as hub:
        async def spoke_status(name: str) -> str:
            return next(s.status for s in (await hub.spokes()).spokes if s.name == name)

        await eventually(lambda: _is(spoke_status("spoke-b"), "ONLINE"), what="ONLINE")
        agent = await hub.spawn(spoke="spoke-b", workspace="research", template="sleeper",
                                task="", params={})
        daemon = fed.spokes["spoke-b"]
        assert daemon.stop() == 0
        stopped = time.monotonic()
        await eventually(lambda: _is(spoke_status("spoke-b"), "OFFLINE"),
                         timeout=TEST_OFFLINE_AFTER + 10, what="OFFLINE")
        assert time.monotonic() - stopped < TEST_OFFLINE_AFTER + 5
        stale = await hub.status(agent.agent_id)
        assert stale.stale and state(stale) == "UNKNOWN" and "last known RUNNING" in stale.reason
        started = time.monotonic()
        with pytest.raises(Unavailable) as err:
            await hub.spawn(spoke="spoke-b", workspace="research", template="sleeper",
                            task="", params={})
        assert "OFFLINE" in err.value.message and time.monotonic() - started < 2
        # The hub answered: the message names the spoke that was down, not the hub.
        assert err.value.message.startswith("spoke 'spoke-b' is OFFLINE"), err.value.message

        fed.spokes["spoke-b"] = await asyncio.to_thread(
            fed.fed.start, "spoke", "spoke-b", daemon.address)
        await eventually(lambda: _is(spoke_status("spoke-b"), "ONLINE"), what="ONLINE again")
        fresh = await hub.status(agent.agent_id)
        assert not fresh.stale and state(fresh) == "RUNNING"
        await hub.kill(agent.agent_id, grace_ms=2000)


async def _is(value: object, expected: str) -> bool:
    return await value == expected  # type: ignore[misc]


async def test_watch_sees_transitions_in_order_and_only_its_tenant(fed: Federation) -> None:
    async with client(fed) as hub, client(fed, "globex") as globex:
        seen: list[wire_pb2.Agent] = []
        other_tenant: list[wire_pb2.Agent] = []

        async def follow(c: HubClient, into: list[wire_pb2.Agent]) -> None:
            async for a in c.watch():
                into.append(a)

        watching = asyncio.create_task(follow(hub, seen))
        spying = asyncio.create_task(follow(globex, other_tenant))
        try:
            # A sentinel proves the stream is live before the agent under test starts.
            sentinel = await hub.spawn(spoke="spoke-a", workspace="research",
                                       template="sleeper", task="sentinel", params={})
            await eventually(lambda: any(a.agent_id == sentinel.agent_id for a in seen),
                             what="the watch stream to carry the sentinel")
            agent = await hub.spawn(spoke="spoke-a", workspace="research",
                                    template="exit-with", task="", params={"code": "0"})
            mine = lambda: [a for a in seen if a.agent_id == agent.agent_id]  # noqa: E731
            await eventually(lambda: any(state(a) == "SUCCEEDED" for a in mine()),
                             what="SUCCEEDED on the watch stream")
            await hub.kill(sentinel.agent_id, grace_ms=2000)
        finally:
            watching.cancel()
            spying.cancel()
        seqs = [a.seq for a in mine()]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs), seqs
        assert state(mine()[-1]) == "SUCCEEDED"
        assert all(a.tenant == "acme" and a.spoke == "spoke-a" for a in seen)
        assert all(a.tenant == "globex" for a in other_tenant)
        assert not any(a.agent_id in (agent.agent_id, sentinel.agent_id)
                       for a in other_tenant)


async def test_logs_are_fetched_from_the_spoke_and_tenant_scoped(fed: Federation) -> None:
    async with client(fed) as hub, client(fed, "globex") as globex:
        agent = await hub.spawn(spoke="spoke-a", workspace="research", template="exit-with",
                                task="hello logs", params={"code": "0"})

        async def has_output() -> bool:
            return "hello logs" in (await hub.logs(agent.agent_id)).text

        await eventually(has_output, what="the agent's output")
        one = await hub.logs(agent.agent_id, tail_lines=1)
        assert one.text.count("\n") <= 1
        with pytest.raises(NotFound):
            await globex.logs(agent.agent_id)


async def test_spoke_killed_hard_readopts_and_collects_how_agents_ended(
        fed: Federation) -> None:
    """A SIGKILLed spoke leaves its agents' supervisors running: the agent killed while
    the spoke was down is recorded with how it ended (SIGKILL), not LOST."""
    async with client(fed) as hub:
        keep = await hub.spawn(spoke="spoke-a", workspace="lab", template="sleeper",
                               task="", params={})
        gone = await hub.spawn(spoke="spoke-a", workspace="lab", template="sleeper",
                               task="", params={})
        daemon = fed.spokes["spoke-a"]
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        kill_marked(gone.agent_id)
        fed.spokes["spoke-a"] = await asyncio.to_thread(
            fed.fed.start, "spoke", "spoke-a", daemon.address)

        async def reconciled() -> bool:
            return (await registry_state(hub, gone.agent_id) == "FAILED"
                    and await registry_state(hub, keep.agent_id) == "RUNNING")

        await eventually(reconciled, what="the end reported, the live agent kept")
        assert "SIGKILL" in (await hub.status(gone.agent_id)).reason
        killed = await hub.kill(keep.agent_id, grace_ms=2000)
        assert state(killed) == "KILLED" and processes_with_marker(keep.agent_id) == []


async def test_spawn_cut_off_by_a_crash_gives_one_agent_on_retry(fed: Federation) -> None:
    """The spoke recorded the message id but died before answering: the retry of the
    same bytes (as the hub sends it) starts exactly one agent."""
    hub_id = load_identity(fed.hub.name, fed.home(fed.hub.name) / "identity.key")
    agent_id = hashlib.sha256(b"crash").hexdigest()[:32]
    cmd = wire_pb2.Command(tenant="acme", workspace="research",
                           principal=wire_pb2.Principal(name="alice", role=Role.OPERATOR.value))
    cmd.spawn.CopyFrom(wire_pb2.SpawnAgent(agent_id=agent_id, template="sleeper"))
    daemon = fed.spokes["spoke-b"]
    assert daemon.stop() == 0
    signed = seal_envelope(hub_id, recipient="spoke-b", command=cmd)
    env = wire_pb2.Envelope.FromString(signed.envelope)
    with sqlite3.connect(fed.home("spoke-b") / "state.db") as conn:
        conn.execute("INSERT INTO seen_messages (sender, message_id, envelope_sha256, "
                     "response, received_at_ms) VALUES (?, ?, ?, NULL, ?)",
                     (env.sender, env.message_id, hashlib.sha256(signed.envelope).hexdigest(),
                      env.issued_at_ms))
    fed.spokes["spoke-b"] = await asyncio.to_thread(
        fed.fed.start, "spoke", "spoke-b", daemon.address)
    async with fed.peer_channel(fed.hub.name, "spoke-b") as ch:
        stub = wire_pb2_grpc.SpokeServiceStub(ch)
        first = await stub.Deliver(signed, timeout=20)
        second = await stub.Deliver(signed, timeout=20)
    assert first.SerializeToString() == second.SerializeToString()
    answer = wire_pb2.Envelope.FromString(first.envelope).response
    assert answer.agent.agent_id == agent_id and state(answer.agent) == "RUNNING"
    assert len(processes_with_marker(agent_id)) == 1
    kill_marked(agent_id)


async def test_the_hub_takes_in_an_agent_it_has_no_record_of(fed: Federation) -> None:
    """A spoke runs an agent for this hub that the hub's registry lost (a restored
    database): its report brings it back, audited. In a tenant the hub does not keep, it
    is refused, audited, and nothing is added."""
    spoke = load_identity("spoke-a", fed.home("spoke-a") / "identity.key")
    unknown = wire_pb2.Agent(agent_id=hashlib.sha256(b"orphan").hexdigest()[:32],
                             tenant="acme", workspace="lab", template="sleeper",
                             principal="alice", reason="running",
                             state=wire_pb2.AgentState.Value("AGENT_STATE_RUNNING"))
    stranger = wire_pb2.Agent()
    stranger.CopyFrom(unknown)
    stranger.agent_id, stranger.tenant = hashlib.sha256(b"stray").hexdigest()[:32], "initech"
    signed = seal_envelope(spoke, recipient=fed.hub.name, report=wire_pb2.StatusReport(
        updates=[wire_pb2.AgentUpdate(agent=unknown, seq=3),
                 wire_pb2.AgentUpdate(agent=stranger, seq=3)]))
    async with fed.peer_channel(spoke.name, fed.hub.name) as ch:
        reply = await wire_pb2_grpc.HubPeerServiceStub(ch).Deliver(signed, timeout=10)
    assert wire_pb2.Envelope.FromString(reply.envelope).response.HasField("ack")
    async with client(fed) as hub:
        taken = await hub.status(unknown.agent_id)
        assert state(taken) == "RUNNING" and taken.spoke == "spoke-a"
    listed = await asyncio.to_thread(fed.fed.cli, "audit", "list", "--home",
                                     str(fed.home(fed.hub.name)), "--json", show=False)
    adoptions = {r["target"]: r for r in json.loads(listed.stdout)
                 if r["action"] == "agent.adopt"}
    assert adoptions[unknown.agent_id]["outcome"] == "allowed"
    assert adoptions[stranger.agent_id]["outcome"] == "refused"
    assert "does not keep" in adoptions[stranger.agent_id]["reason"]
    with closing(sqlite3.connect(fed.home(fed.hub.name) / "state.db")) as conn:
        assert conn.execute("SELECT count(*) FROM hub_agents WHERE agent_id = ?",
                            (stranger.agent_id,)).fetchone()[0] == 0


async def test_a_command_past_its_deadline_does_nothing(fed: Federation) -> None:
    """Bytes held back until after the hub gave up (and told its caller the spawn failed)
    must not start an agent when they arrive: the spoke refuses, audited, and the same
    bytes again get the same refusal."""
    hub_id = load_identity(fed.hub.name, fed.home(fed.hub.name) / "identity.key")
    agent_id = hashlib.sha256(b"late").hexdigest()[:32]
    cmd = wire_pb2.Command(tenant="acme", workspace="research",
                           principal=wire_pb2.Principal(name="alice", role=Role.OPERATOR.value),
                           deadline_ms=int(time.time() * 1000) - 1500)
    cmd.spawn.CopyFrom(wire_pb2.SpawnAgent(agent_id=agent_id, template="sleeper"))
    signed = seal_envelope(hub_id, recipient="spoke-b", command=cmd)
    async with fed.peer_channel(fed.hub.name, "spoke-b") as ch:
        stub = wire_pb2_grpc.SpokeServiceStub(ch)
        answers = [await stub.Deliver(signed, timeout=20) for _ in range(2)]
    refused = [wire_pb2.Envelope.FromString(a.envelope).response for a in answers]
    assert refused[0] == refused[1] and refused[0].WhichOneof("result") == "error"
    assert "after its deadline" in refused[0].error.message
    assert agent_id not in fed.fed.agent_ids("spoke-b")
    assert processes_with_marker(agent_id) == []
    listed = await asyncio.to_thread(fed.fed.cli, "audit", "list", "--home",
                                     str(fed.home("spoke-b")), "--json", show=False)
    audit = json.loads(listed.stdout)
    assert any(r["outcome"] == "refused" and "after its deadline" in r["reason"]
               for r in audit)


async def test_the_hub_gives_each_command_the_deadline_it_keeps_to(fed: Federation) -> None:
    """The deadline a hub signs into a command is when its own retries end."""
    from hub.dispatch import SpokeDispatcher
    from shared.config import load_config

    cfg = load_config(fed.home(fed.hub.name))
    dispatcher = SpokeDispatcher(cfg, load_identity(fed.hub.name,
                                                    fed.home(fed.hub.name) / "identity.key"),
                                 keyring=None, certs=None, metrics=None)  # type: ignore[arg-type]
    before = int(time.time() * 1000)
    _, signed = dispatcher.seal("spoke-a", wire_pb2.Command(tenant="acme"), extra_timeout=3)
    deadline = wire_pb2.Envelope.FromString(signed.envelope).command.deadline_ms
    retry = cfg.retry
    assert dispatcher.budget_seconds(3) >= retry.attempts * (retry.attempt_timeout_seconds + 3)
    assert before + dispatcher.budget_seconds(3) * 1000 <= deadline <= (
        int(time.time() * 1000) + dispatcher.budget_seconds(3) * 1000)
    await dispatcher.close()


def test_spoke_list_and_logs_through_the_cli(fed: Federation) -> None:
    env = fed.agent_env("acme")
    out = fed.fed.cli("spoke", "list", "--json", env=env, show=False).stdout
    spokes = {s["name"]: s for s in json.loads(out)}
    assert set(spokes) >= {"spoke-a", "spoke-b"}
    assert all(s["status"] in ("ONLINE", "OFFLINE", "UNKNOWN") for s in spokes.values())
