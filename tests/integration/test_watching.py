"""Watching real daemons: Prometheus metrics that move with real traffic, gRPC server
reflection, and log lines (JSON by default, text on request) that never hold a token,
a key or a task's text."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from hub.client import HubClient
from hub.demo import FLEETWIRE
from shared.envelope import new_message_id, seal_envelope
from shared.errors import NotFound, Unauthenticated
from shared.identity import load_identity
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.scope import Role
from tests.conftest import TEST_OFFLINE_AFTER, Federation, InProcessFederation
from tests.integration.helpers import eventually, state

SPOKE = "spoke-w"
WATCH = ("--metrics", "127.0.0.1:0")
LOG_KEYS = {"time", "level", "instance", "logger", "event"}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Watched:
    fed: Federation
    metrics: dict[str, str]  # instance name -> HOST:PORT of its /metrics


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Watched]:
    """A hub and one spoke of their own, both serving metrics."""
    fed = InProcessFederation(root=tmp_path_factory.mktemp("watched"))
    try:
        hub_name = f"hub-{secrets.token_hex(2)}"
        home = fed.init(hub_name)
        config = home / "config.toml"
        config.write_text(config.read_text().replace(
            "offline_after_seconds = 15", f"offline_after_seconds = {TEST_OFFLINE_AFTER}"))
        fed.cli("tenant", "create", "--home", str(home), "acme")
        hub = fed.start("hub", hub_name, "127.0.0.1:0", *WATCH)
        federation = Federation(fed=fed, hub=hub, spokes={}, tokens={})
        federation.add_spoke(SPOKE, tenants={"acme": ["research"]}, start=False)
        spoke = fed.start("spoke", SPOKE, "127.0.0.1:0", *WATCH)
        fed.trust(hub_name, SPOKE, address=spoke.address)
        federation.spokes[SPOKE] = spoke
        federation.tokens = {
            "acme": federation.token("acme", principal="alice", role="operator"),
            "acme-admin": federation.token("acme", principal="ada", role="admin"),
        }
        yield Watched(federation, {hub_name: hub.metrics_address(),
                                   SPOKE: spoke.metrics_address()})
    finally:
        fed.close()


async def scrape(address: str) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
            assert resp.status == 200
            return str(resp.read().decode())

    text = await asyncio.to_thread(get)
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def command(agent_id: str) -> wire_pb2.Command:
    cmd = wire_pb2.Command(tenant="acme", workspace="research", principal=wire_pb2.Principal(
        name="watch-test", role=Role.OPERATOR.value))
    cmd.get.agent_id = agent_id
    return cmd


async def refused_envelopes(fed: Federation) -> None:
    """Deliver to the spoke, as the hub: a tampered envelope, then a replay."""
    hub = load_identity(fed.hub.name, fed.home(fed.hub.name) / "identity.key")
    tampered = seal_envelope(hub, recipient=SPOKE, command=command(secrets.token_hex(16)))
    tampered.signature = bytes([tampered.signature[0] ^ 1]) + tampered.signature[1:]
    message_id = new_message_id()
    first = seal_envelope(hub, recipient=SPOKE, command=command(secrets.token_hex(16)),
                          message_id=message_id)
    replay = seal_envelope(hub, recipient=SPOKE, command=command(secrets.token_hex(16)),
                           message_id=message_id)
    async with fed.peer_channel(fed.hub.name, SPOKE) as channel:
        stub = wire_pb2_grpc.SpokeServiceStub(channel)
        await stub.Deliver(first, timeout=20)  # answered: a signed NOT_FOUND
        for signed in (tampered, replay):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Deliver(signed, timeout=20)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_metrics_move_with_real_traffic(watched: Watched) -> None:
    fed = watched.fed
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke=SPOKE, workspace="research", template="sleeper",
                                task="count the metrics", params={})
        assert state(await hub.status(agent.agent_id, live=True)) == "RUNNING"
        assert state(await hub.kill(agent.agent_id, grace_ms=2000)) == "KILLED"
        with pytest.raises(NotFound):
            await hub.status(secrets.token_hex(16))
    async with HubClient(fed.hub.address, "fwt_" + secrets.token_urlsafe(32)) as stranger:
        with pytest.raises(Unauthenticated):
            await stranger.list()
    await refused_envelopes(fed)

    spoke = await scrape(watched.metrics[SPOKE])
    for kind in ("spawn", "get", "kill"):
        assert value(spoke, "fleetwire_commands_total", kind=kind, outcome="ok") >= 1, kind
    assert value(spoke, "fleetwire_commands_total", kind="get", outcome="not_found") >= 1
    assert value(spoke, "fleetwire_command_duration_seconds_count", kind="spawn") >= 1
    for reason in ("bad_signature", "replay"):
        assert value(spoke, "fleetwire_envelope_rejections_total", reason=reason) >= 1, reason
    assert ("fleetwire_envelope_rejections_total",
            frozenset({("reason", "skew")})) in spoke, "every reason is there from the start"

    hub_metrics = await scrape(watched.metrics[fed.hub.name])
    for kind in ("spawn", "get", "kill"):
        assert value(hub_metrics, "fleetwire_commands_total", kind=kind, outcome="ok") >= 1
    requests = "fleetwire_operator_requests_total"
    assert value(hub_metrics, requests, method="SpawnAgent", outcome="ok") >= 1
    assert value(hub_metrics, requests, method="GetAgent", outcome="not_found") >= 1
    assert value(hub_metrics, requests, method="ListAgents", outcome="unauthenticated") >= 1
    assert value(hub_metrics, "fleetwire_operator_request_duration_seconds_count",
                 method="KillAgent") >= 1

    # Gauges are read from each daemon's database when scraped.
    async def gauges_caught_up() -> bool:
        at_spoke = await scrape(watched.metrics[SPOKE])
        at_hub = await scrape(watched.metrics[fed.hub.name])
        return (value(at_spoke, "fleetwire_agents", state="killed") >= 1
                and value(at_spoke, "fleetwire_agents", state="running") == 0
                and ("fleetwire_outbox_depth", frozenset()) in at_spoke
                and value(at_spoke, "fleetwire_outbox_depth") == 0
                and value(at_hub, "fleetwire_agents", state="killed") >= 1
                and value(at_hub, "fleetwire_spokes_online") == 1
                and value(at_hub, "fleetwire_spokes", state="online") == 1)

    await eventually(gauges_caught_up, what="the agent and spoke gauges")


async def test_the_hubs_commands_travel_on_one_stream(watched: Watched) -> None:
    """Commands from the hub to a spoke share one Exchange stream (ADR 0021), side by
    side: twenty at once are twenty deliveries on it, and no second stream opens."""
    fed = watched.fed
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke=SPOKE, workspace="research", template="sleeper",
                                task="one stream", params={})
        before = await scrape(watched.metrics[SPOKE])
        answers = await asyncio.gather(*(hub.status(agent.agent_id, live=True)
                                         for _ in range(20)))
        assert {state(a) for a in answers} == {"RUNNING"}
        after = await scrape(watched.metrics[SPOKE])
        await hub.kill(agent.agent_id, grace_ms=2000)
    assert value(after, "fleetwire_command_streams") == 1
    carried = (value(after, "fleetwire_stream_deliveries_total")
               - value(before, "fleetwire_stream_deliveries_total"))
    assert carried >= 20
    gets = (value(after, "fleetwire_commands_total", kind="get", outcome="ok")
            - value(before, "fleetwire_commands_total", kind="get", outcome="ok"))
    assert gets == 20


async def test_reflection_lists_the_services(watched: Watched) -> None:
    fed = watched.fed
    health = "grpc.health.v1.Health"
    reflection = "grpc.reflection.v1alpha.ServerReflection"
    async with grpc.aio.insecure_channel(fed.hub.address) as channel:
        assert await services(channel) == {
            "fleetwire.v1.OperatorService", "fleetwire.v1.HubPeerService",
            "fleetwire.v1.JoinService", health, reflection}
        assert await file_of(channel, "fleetwire.v1.OperatorService")
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="fleetwire.v1.OperatorService"), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    async with fed.peer_channel(fed.hub.name, SPOKE) as channel:
        assert await services(channel) == {"fleetwire.v1.SpokeService", health, reflection}
        assert await file_of(channel, "fleetwire.v1.SpokeService")


async def reflect(channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest
                  ) -> reflection_pb2.ServerReflectionResponse:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    async for response in stub.ServerReflectionInfo(iter([request]), timeout=10):
        return response
    raise AssertionError("no reflection answer")


async def services(channel: grpc.aio.Channel) -> set[str]:
    response = await reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
    return {s.name for s in response.list_services_response.service}


async def file_of(channel: grpc.aio.Channel, symbol: str) -> list[bytes]:
    response = await reflect(channel, reflection_pb2.ServerReflectionRequest(
        file_containing_symbol=symbol))
    return list(response.file_descriptor_response.file_descriptor_proto)


async def test_logs_are_json_lines_without_secrets(watched: Watched) -> None:
    fed = watched.fed
    task = f"distinctive-task-{secrets.token_hex(8)}"
    async with HubClient(fed.hub.address, fed.tokens["acme-admin"]) as admin:
        agent = await admin.spawn(spoke=SPOKE, workspace="research", template="exit-with",
                                  task=task, params={"code": "3"})
        issued = await admin.create_token("carl", Role.OPERATOR)
        await admin.kill(agent.agent_id, grace_ms=0)
    bogus_bearer = "fwt_" + secrets.token_urlsafe(32)
    async with HubClient(fed.hub.address, bogus_bearer) as stranger:
        with pytest.raises(Unauthenticated):
            await stranger.spawn(spoke=SPOKE, workspace="research", template="sleeper",
                                 task=task, params={})
    joining = "spoke-j"
    await asyncio.to_thread(fed.fed.init, joining)
    made = await asyncio.to_thread(
        fed.fed.cli, "join-token", "create", "--home", str(fed.home(fed.hub.name)),
        "--name", joining, "--json", show=False)
    join_token = json.loads(made.stdout)["token"]
    bogus_join = f"fwj1.{secrets.token_urlsafe(32)}.{join_token.rsplit('.', 1)[1]}"
    for token in (bogus_join, join_token):
        await asyncio.to_thread(fed.fed.cli, "join", "--home", str(fed.home(joining)),
                                "--hub", fed.hub.address, "--token", token, check=False,
                                show=False)
    hub_log = fed.home(fed.hub.name) / "hub.log"
    await eventually(lambda: f"spoke {joining} joined" in hub_log.read_text(),
                     what="the hub to log the join")

    secrets_seen = [fed.tokens["acme"], fed.tokens["acme-admin"], issued.token,
                    bogus_bearer, join_token, bogus_join, task,
                    join_token.split(".")[1], bogus_join.split(".")[1]]
    for name, role in ((fed.hub.name, "hub"), (SPOKE, "spoke")):
        text = (fed.home(name) / f"{role}.log").read_text()
        for secret in secrets_seen:
            assert secret not in text, f"{role}'s log holds a secret or the task text"
        for line in text.splitlines():
            entry = json.loads(line)
            assert entry.keys() >= LOG_KEYS, line
            assert entry["instance"] == name and entry["time"].endswith("Z")
    joined = [entry for entry in map(json.loads, hub_log.read_text().splitlines())
              if entry["event"].startswith(f"spoke {joining} joined")]
    assert [entry.get("peer") for entry in joined] == [joining]


async def test_text_log_format_and_options_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fed = InProcessFederation(root=tmp_path)
    try:
        name = f"hub-{secrets.token_hex(2)}"
        home = await asyncio.to_thread(fed.init, name)
        refused = await asyncio.to_thread(
            subprocess.run, [*FLEETWIRE, "hub", "run", "--home", str(home), "--listen",
                             "127.0.0.1:0", "--metrics", "127.0.0.1"],
            capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "is not HOST:PORT" in refused.stderr
        monkeypatch.setenv("FLEETWIRE_LOG_FORMAT", "text")
        monkeypatch.setenv("FLEETWIRE_METRICS", "127.0.0.1:0")
        hub = await asyncio.to_thread(fed.start, "hub", name)
        assert ("fleetwire_commands_total", frozenset()) not in await scrape(
            hub.metrics_address())
        await asyncio.to_thread(hub.stop)
    finally:
        await asyncio.to_thread(fed.close)
    lines = (home / "hub.log").read_text().splitlines()
    assert any("stopping" in line for line in lines)
    for line in lines:
        assert re.match(rf"\d{{4}}-\d\d-\d\dT[\d:.]+Z [A-Z]+ {name} \S+: ", line), line
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)


async def test_sigusr1_logs_what_a_daemon_waits_for_and_it_goes_on(watched: Watched) -> None:
    """SIGUSR1 (what the test harness sends before SIGKILL to a daemon that does not
    stop) logs every asyncio task and prints every thread's stack; the daemon serves on."""
    spoke = watched.fed.spokes[SPOKE]
    log = spoke.home / "spoke.log"
    before = log.stat().st_size
    spoke.proc.send_signal(signal.SIGUSR1)

    def dumped() -> bool:
        text = log.read_text()[before:]
        return "Current thread" in text and '"event": "task status-reporter' in text

    await eventually(dumped, what="the task and thread dump in the spoke's log")
    async with HubClient(watched.fed.hub.address, watched.fed.tokens["acme"]) as hub:
        agents = await hub.list(spoke=SPOKE, live=True)
    assert spoke.proc.poll() is None
    assert all(a.spoke == SPOKE for a in agents.agents)
