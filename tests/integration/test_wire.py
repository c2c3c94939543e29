"""The wire rules against a real spoke: every forged, stale, misdirected or replayed
envelope is refused before anything happens; retries get the first answer."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from shared.envelope import SIGNING_PREFIX, PeerKey, now_ms, open_envelope, seal_envelope
from shared.identity import Identity, load_identity
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.scope import Role
from tests.conftest import Federation
from tests.integration.helpers import processes_with_marker, state


def hub_identity(fed: Federation) -> Identity:
    return load_identity(fed.hub.name, fed.home(fed.hub.name) / "identity.key")


def spoke_identity(fed: Federation, name: str) -> Identity:
    return load_identity(name, fed.home(name) / "identity.key")


def command(action: str, agent_id: str = "", workspace: str = "research") -> wire_pb2.Command:
    cmd = wire_pb2.Command(tenant="acme", workspace=workspace,
                           principal=wire_pb2.Principal(name="wire-test",
                                                        role=Role.OPERATOR.value))
    if action == "spawn":
        cmd.spawn.CopyFrom(wire_pb2.SpawnAgent(agent_id=agent_id, template="sleeper"))
    elif action == "get":
        cmd.get.agent_id = agent_id
    elif action == "kill":
        cmd.kill.agent_id = agent_id
        cmd.kill.grace_ms = 2000
    return cmd


def new_id() -> str:
    return secrets.token_hex(16)


class _Keyring:
    def __init__(self, ident: Identity) -> None:
        self._key = PeerKey(ident.name, True, ident.key_id, True, ident.public_key)

    async def find_key(self, key_id: str) -> PeerKey | None:
        return self._key if key_id == self._key.key_id else None


async def deliver(fed: Federation, signed: wire_pb2.SignedEnvelope,
                  spoke: str = "spoke-a") -> wire_pb2.SignedEnvelope:
    async with fed.peer_channel(fed.hub.name, spoke) as channel:
        return await wire_pb2_grpc.SpokeServiceStub(channel).Deliver(signed, timeout=20)


async def answer(fed: Federation, signed: wire_pb2.SignedEnvelope,
                 spoke: str = "spoke-a") -> wire_pb2.Response:
    """Deliver and verify the spoke's signed reply the way the hub does."""
    reply = await deliver(fed, signed, spoke)
    sent = wire_pb2.Envelope.FromString(signed.envelope)
    opened = await open_envelope(reply, keyring=_Keyring(spoke_identity(fed, spoke)),
                                 me=fed.hub.name)
    assert opened.envelope.sender == spoke
    assert opened.envelope.in_reply_to == sent.message_id
    return opened.envelope.response


async def refused(fed: Federation, signed: wire_pb2.SignedEnvelope,
                  code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await deliver(fed, signed)
    assert err.value.code() == code, err.value.details()
    return err.value.details() or ""


async def assert_absent(fed: Federation, agent_id: str) -> None:
    """The spoke (asked with a valid command) has no such agent, and no process runs."""
    resp = await answer(fed, seal_envelope(hub_identity(fed), recipient="spoke-a",
                                           command=command("get", agent_id)))
    assert resp.error.code == wire_pb2.ERROR_CODE_NOT_FOUND
    assert processes_with_marker(agent_id) == []


async def test_valid_spawn_gets_a_signed_reply(federation: Federation) -> None:
    agent_id = new_id()
    resp = await answer(federation, seal_envelope(hub_identity(federation), recipient="spoke-a",
                                                  command=command("spawn", agent_id)))
    assert resp.agent.agent_id == agent_id and state(resp.agent) == "RUNNING"
    killed = await answer(federation, seal_envelope(
        hub_identity(federation), recipient="spoke-a", command=command("kill", agent_id)))
    assert state(killed.agent) == "KILLED"


async def test_tampered_signature_is_refused(federation: Federation) -> None:
    agent_id = new_id()
    signed = seal_envelope(hub_identity(federation), recipient="spoke-a",
                           command=command("spawn", agent_id))
    sig = bytearray(signed.signature)
    sig[0] ^= 0x01
    signed.signature = bytes(sig)
    assert "signature does not verify" in await refused(federation, signed)
    await assert_absent(federation, agent_id)


async def test_tampered_envelope_bytes_are_refused(federation: Federation) -> None:
    agent_id = new_id()
    signed = seal_envelope(hub_identity(federation), recipient="spoke-a",
                           command=command("spawn", agent_id))
    # Swap the workspace after signing: the classic body swap.
    signed.envelope = signed.envelope.replace(b"research", b"lab\x00\x00\x00\x00\x00")
    assert "signature does not verify" in await refused(federation, signed)
    await assert_absent(federation, agent_id)


async def test_wrong_recipient_is_refused(federation: Federation) -> None:
    agent_id = new_id()
    signed = seal_envelope(hub_identity(federation), recipient="spoke-b",
                           command=command("spawn", agent_id))
    assert "addressed to 'spoke-b'" in await refused(federation, signed)
    await assert_absent(federation, agent_id)


@pytest.mark.parametrize("offset_ms", [-120_000, 120_000])
async def test_stale_or_future_timestamp_is_refused(federation: Federation,
                                                    offset_ms: int) -> None:
    agent_id = new_id()
    signed = seal_envelope(hub_identity(federation), recipient="spoke-a",
                           command=command("spawn", agent_id),
                           issued_at_ms=now_ms() + offset_ms)
    assert "issued_at" in await refused(federation, signed)
    await assert_absent(federation, agent_id)


async def test_unknown_sender_is_refused(federation: Federation) -> None:
    agent_id = new_id()
    stranger = Identity(name=federation.hub.name, private_key=Ed25519PrivateKey.generate())
    signed = seal_envelope(stranger, recipient="spoke-a", command=command("spawn", agent_id))
    assert "unknown key" in await refused(federation, signed)
    await assert_absent(federation, agent_id)


async def test_same_message_id_with_other_bytes_is_a_replay(federation: Federation) -> None:
    first_id, second_id = new_id(), new_id()
    ident = hub_identity(federation)
    first = seal_envelope(ident, recipient="spoke-a", command=command("spawn", first_id))
    message_id = wire_pb2.Envelope.FromString(first.envelope).message_id
    resp = await answer(federation, first)
    assert resp.agent.agent_id == first_id
    second = seal_envelope(ident, recipient="spoke-a", command=command("spawn", second_id),
                           message_id=message_id)
    assert "replay" in await refused(federation, second)
    await assert_absent(federation, second_id)
    await answer(federation, seal_envelope(ident, recipient="spoke-a",
                                           command=command("kill", first_id)))


async def test_retried_message_returns_first_answer_without_second_process(
        federation: Federation) -> None:
    agent_id = new_id()
    ident = hub_identity(federation)
    signed = seal_envelope(ident, recipient="spoke-a", command=command("spawn", agent_id))
    first = await deliver(federation, signed)
    again, concurrent = await asyncio.gather(deliver(federation, signed),
                                             deliver(federation, signed))
    assert first.SerializeToString() == again.SerializeToString()
    assert first.SerializeToString() == concurrent.SerializeToString()
    assert len(processes_with_marker(agent_id)) == 1
    await answer(federation, seal_envelope(ident, recipient="spoke-a",
                                           command=command("kill", agent_id)))


async def test_malformed_and_oversized_envelopes_are_refused_and_spoke_keeps_serving(
        federation: Federation) -> None:
    ident = hub_identity(federation)
    garbage = b"\xff\xff\xff not a protobuf"
    malformed = wire_pb2.SignedEnvelope(envelope=garbage, key_id=ident.key_id,
                                        signature=ident.sign(SIGNING_PREFIX + garbage))
    assert "not an Envelope" in await refused(federation, malformed,
                                              grpc.StatusCode.INVALID_ARGUMENT)
    huge = wire_pb2.SignedEnvelope(envelope=b"x" * (5 * 1024 * 1024), key_id=ident.key_id)
    await refused(federation, huge, grpc.StatusCode.RESOURCE_EXHAUSTED)
    big = wire_pb2.SignedEnvelope(envelope=b"x" * (1024 * 1024), key_id=ident.key_id)
    assert "exceeds" in await refused(federation, big, grpc.StatusCode.INVALID_ARGUMENT)
    empty = wire_pb2.SignedEnvelope()
    await refused(federation, empty)
    # A response is not something a spoke takes.
    not_a_command = seal_envelope(ident, recipient="spoke-a", response=wire_pb2.Response())
    await refused(federation, not_a_command, grpc.StatusCode.INVALID_ARGUMENT)
    # Still serving.
    await assert_absent(federation, new_id())


async def test_agent_in_other_workspace_is_not_found_on_the_spoke(
        federation: Federation) -> None:
    """Authorize against the agent's own scope, not the one the command names."""
    ident = hub_identity(federation)
    agent_id = new_id()
    await answer(federation, seal_envelope(ident, recipient="spoke-a",
                                           command=command("spawn", agent_id)))
    for action in ("get", "kill"):
        resp = await answer(federation, seal_envelope(
            ident, recipient="spoke-a", command=command(action, agent_id, workspace="lab")))
        assert resp.error.code == wire_pb2.ERROR_CODE_NOT_FOUND
    assert len(processes_with_marker(agent_id)) == 1
    await answer(federation, seal_envelope(ident, recipient="spoke-a",
                                           command=command("kill", agent_id)))


async def test_ungranted_tenant_and_missing_workspace_read_like_absence(
        federation: Federation) -> None:
    ident = hub_identity(federation)
    messages = []
    for tenant, workspace in (("initech", "research"), ("acme", "nope")):
        cmd = command("spawn", new_id())
        cmd.tenant, cmd.workspace = tenant, workspace
        resp = await answer(federation, seal_envelope(ident, recipient="spoke-a", command=cmd))
        assert resp.error.code == wire_pb2.ERROR_CODE_NOT_FOUND
        messages.append(resp.error.message.replace(workspace, "W"))
    assert messages[0] == messages[1]



async def test_daemons_report_serving_on_grpc_health(federation: Federation) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channels = ((federation.peer_channel(federation.hub.name, "spoke-a"),
                 "fleetwire.v1.SpokeService"),
                (grpc.aio.insecure_channel(federation.hub.address),
                 "fleetwire.v1.OperatorService"))
    for channel, service in channels:
        async with channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("deadline", [0.005, 0.02, 0.05, 0.1])
async def test_a_spawn_whose_caller_gave_up_still_runs_once(federation: Federation,
                                                            deadline: float) -> None:
    """The first attempt's deadline passes at some point of the spawn (or not at all);
    wherever it was cut, the spoke finishes the spawn, and the retry of the same bytes
    gets an agent that runs, once — never a record left PENDING."""
    agent_id = new_id()
    signed = seal_envelope(hub_identity(federation), recipient="spoke-a",
                           command=command("spawn", agent_id))
    async with federation.peer_channel(federation.hub.name, "spoke-a") as channel:
        stub = wire_pb2_grpc.SpokeServiceStub(channel)
        try:
            await stub.Deliver(signed, timeout=deadline)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        retried = await stub.Deliver(signed, timeout=20)
        agent = wire_pb2.Envelope.FromString(retried.envelope).response.agent
        assert agent.agent_id == agent_id and state(agent) == "RUNNING"
        assert len(processes_with_marker(agent_id)) == 1
        kill = seal_envelope(hub_identity(federation), recipient="spoke-a",
                             command=command("kill", agent_id))
        killed = await stub.Deliver(kill, timeout=20)
    assert state(wire_pb2.Envelope.FromString(killed.envelope).response.agent) == "KILLED"
    assert processes_with_marker(agent_id) == []


@pytest.mark.parametrize("wait", [0.0, 0.005, 0.02, 0.05])
async def test_a_spawn_whose_command_stream_was_cut_still_runs_once(
        federation: Federation, wait: float) -> None:
    """The hub's Exchange stream is cancelled at some point of a spawn it carries (or
    after its answer): the spoke finishes the spawn in the delivery's own task, and the
    same bytes sent again on a new stream get an agent that runs, once."""
    agent_id = new_id()
    signed = seal_envelope(hub_identity(federation), recipient="spoke-a",
                           command=command("spawn", agent_id))
    async with federation.peer_channel(federation.hub.name, "spoke-a") as channel:
        stub = wire_pb2_grpc.SpokeServiceStub(channel)
        cut = stub.Exchange()
        await cut.write(wire_pb2.Delivery(call=1, envelope=signed))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cut.read(), timeout=wait)
        cut.cancel()
        again = stub.Exchange(timeout=20)
        await again.write(wire_pb2.Delivery(call=1, envelope=signed))
        frame = await again.read()
        assert frame.WhichOneof("outcome") == "envelope", frame.refusal.message
        agent = wire_pb2.Envelope.FromString(frame.envelope.envelope).response.agent
        assert agent.agent_id == agent_id and state(agent) == "RUNNING"
        assert len(processes_with_marker(agent_id)) == 1
        await again.write(wire_pb2.Delivery(call=2, envelope=seal_envelope(
            hub_identity(federation), recipient="spoke-a", command=command("kill", agent_id))))
        killed = await again.read()
        await again.done_writing()
    assert state(wire_pb2.Envelope.FromString(killed.envelope.envelope).response.agent
                 ) == "KILLED"
    assert processes_with_marker(agent_id) == []
