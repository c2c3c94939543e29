"""TLS between instances: on by default, bound to the peer record, plaintext only on
loopback with --insecure, private key files that others can read refused; and peer
suspension and revocation acting on the next message."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hub.client import HubClient
from hub.demo import FLEETWIRE
from shared.envelope import seal_envelope
from shared.errors import Unauthenticated
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from tests.conftest import Federation, build_federation
from tests.integration.helpers import eventually, state
from tests.integration.test_join import cli
from tests.integration.test_wire import command, hub_identity


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A federation of its own: these tests suspend and revoke peers."""
    yield from build_federation(tmp_path_factory.mktemp("tls"))


def run(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Start a daemon that is expected to refuse to start."""
    return subprocess.run([*FLEETWIRE, *args, "--home", str(home)], capture_output=True,
                          text=True, timeout=60)


def get_command(fed: Federation, spoke: str) -> wire_pb2.SignedEnvelope:
    cmd = command("list")
    cmd.list.SetInParent()
    return seal_envelope(hub_identity(fed), recipient=spoke, command=cmd)


async def test_instances_talk_mutual_tls_by_default(fed: Federation) -> None:
    """A plaintext client, and a TLS client without a certificate, cannot even reach a
    spoke; the hub's own certificate can."""
    signed = get_command(fed, "spoke-a")
    address = fed.spokes["spoke-a"].address
    hub_cert = (fed.home("spoke-a") / "tls.crt").read_bytes()
    for channel in (grpc.aio.insecure_channel(address),
                    grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(hub_cert),
                                            options=[("grpc.ssl_target_name_override",
                                                      "spoke-a")])):
        async with channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await wire_pb2_grpc.SpokeServiceStub(channel).Deliver(signed, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    async with fed.peer_channel(fed.hub.name, "spoke-a") as channel:
        reply = await wire_pb2_grpc.SpokeServiceStub(channel).Deliver(signed, timeout=10)
    assert wire_pb2.Envelope.FromString(reply.envelope).response.HasField("agents")


async def test_the_tls_certificate_must_be_the_signers(fed: Federation) -> None:
    """An instance the spoke trusts at the TLS level cannot carry the hub's signed
    command: the certificate of the connection must be the one pinned for the signer."""
    await asyncio.to_thread(fed.fed.init, "intruder")
    await asyncio.to_thread(fed.fed.trust, "spoke-a", "intruder")
    seen: list[grpc.aio.AioRpcError] = []

    async def past_the_handshake() -> bool:
        # Until the spoke's next look at its peer table (a second at most), the
        # intruder's certificate is not accepted even for the handshake.
        async with fed.peer_channel("intruder", "spoke-a") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await wire_pb2_grpc.SpokeServiceStub(channel).Deliver(
                    get_command(fed, "spoke-a"), timeout=10)
        seen.append(err.value)
        return err.value.code() != grpc.StatusCode.UNAVAILABLE

    await eventually(past_the_handshake, what="the spoke to trust the intruder's certificate")
    assert seen[-1].code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"not the one pinned for '{fed.hub.name}'" in (seen[-1].details() or "")
    # On a command stream (its connection's certificate is read once per stream), each
    # delivery is refused the same way; the hub's own stream is answered.
    for sender, refused in (("intruder", True), (fed.hub.name, False)):
        async with fed.peer_channel(sender, "spoke-a") as channel:
            stream = wire_pb2_grpc.SpokeServiceStub(channel).Exchange(timeout=10)
            for call in (1, 2):
                await stream.write(wire_pb2.Delivery(call=call,
                                                     envelope=get_command(fed, "spoke-a")))
                answer = await stream.read()
                assert answer.call == call
                if refused:
                    assert answer.refusal.status == grpc.StatusCode.UNAUTHENTICATED.value[0]
                    assert f"not the one pinned for '{fed.hub.name}'" in answer.refusal.message
                else:
                    assert answer.WhichOneof("outcome") == "envelope"
            await stream.done_writing()


async def test_suspend_resume_and_revoke_act_on_the_next_message(fed: Federation) -> None:
    hub_home, spoke_home = fed.home(fed.hub.name), fed.home("spoke-b")
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-b", workspace="lab", template="sleeper",
                                task="", params={})
        await cli(fed, "peer", "suspend", "--home", str(spoke_home), fed.hub.name)
        with pytest.raises(Unauthenticated) as err:
            await hub.status(agent.agent_id, live=True)
        assert "is suspended, not active" in err.value.message
        await cli(fed, "peer", "resume", "--home", str(spoke_home), fed.hub.name)
        assert state(await hub.status(agent.agent_id, live=True)) == "RUNNING"

        await cli(fed, "peer", "revoke", "--home", str(spoke_home), fed.hub.name)
        with pytest.raises(Unauthenticated) as err:
            await hub.kill(agent.agent_id)
        assert "is revoked, not active" in err.value.message
        again = await cli(fed, "peer", "resume", "--home", str(spoke_home), fed.hub.name,
                          check=False)
        assert again.returncode == 2 and "revocation is for good" in again.stderr
    # The agent the revoked hub can no longer reach is still the spoke's to stop.
    await cli(fed, "spoke", "drain", "--home", str(spoke_home), "--reason", "test over")
    assert hub_home.exists()


def test_plaintext_off_loopback_is_refused_at_start(fed: Federation, tmp_path: Path) -> None:
    home = fed.home("spoke-a")
    spoke = run(home, "spoke", "run", "--insecure", "--listen", "0.0.0.0:0")
    assert spoke.returncode == 2
    assert "refusing to serve the spoke's command API in plaintext on 0.0.0.0:0" in spoke.stderr
    hub = run(fed.home(fed.hub.name), "hub", "run", "--insecure", "--listen", "127.0.0.1:0",
              "--peer-listen", "0.0.0.0:0")
    assert hub.returncode == 2 and "plaintext is only allowed on loopback" in hub.stderr


@pytest.mark.parametrize("key_file", ["identity.key", "tls.key"])
def test_a_key_file_others_can_read_is_refused(fed: Federation, key_file: str) -> None:
    home = fed.fed.init(f"leaky-{key_file.split('.')[0]}")
    assert (os.stat(home / "identity.key").st_mode & 0o777) == 0o600
    assert (os.stat(home / "tls.key").st_mode & 0o777) == 0o600
    os.chmod(home / key_file, 0o644)
    result = run(home, "spoke", "run", "--listen", "127.0.0.1:0")
    assert result.returncode == 2
    assert f"{home / key_file} is readable by others (mode 644)" in result.stderr
    assert f"chmod 600 {home / key_file}" in result.stderr
    # Refused before it acted: no cgroup folder made for it, no agent touched.
    assert not list(Path("/sys/fs/cgroup").glob(f"*/fleetwire-{home.name}"))


async def test_operator_api_over_tls_with_a_ca_file_or_a_pin(fed: Federation) -> None:
    hub = await asyncio.to_thread(fed.fed.start, "hub", fed.hub.name, "127.0.0.1:0",
                                  "--operator-tls")
    try:
        home = fed.home(fed.hub.name)
        pin = json.loads((await cli(fed, "identity", "show", "--home", str(home),
                                    "--json")).stdout)["tls_fingerprint"]
        env = {"FLEETWIRE_HUB": hub.address, "FLEETWIRE_TOKEN": fed.tokens["acme"]}
        for ca in (str(home / "tls.crt"), pin):
            ok = await cli(fed, "agent", "list", "--hub-ca", ca, "--json", env=env)
            assert isinstance(json.loads(ok.stdout), list)
        wrong = await cli(fed, "agent", "list", "--hub-ca", "sha256:" + "0" * 64, env=env,
                          check=False)
        assert wrong.returncode == 5 and "not the pinned" in wrong.stderr
        other = await cli(fed, "agent", "list", "--hub-ca", str(fed.home("spoke-a") / "tls.crt"),
                          env=env, check=False)
        assert other.returncode == 7, other.stderr  # the handshake fails: not that certificate
        plain = await cli(fed, "agent", "list", env=env, check=False)
        assert plain.returncode == 2 and "speaks TLS: pass --hub-ca" in plain.stderr
    finally:
        hub.stop()


async def test_insecure_instances_work_in_plaintext_on_loopback(fed: Federation) -> None:
    """--insecure on both sides (loopback only): the same signed commands, no TLS."""
    local = fed.fed
    for name in ("hub-plain", "spoke-plain"):
        await asyncio.to_thread(local.init, name)
        await cli(fed, "tenant", "create", "--home", str(fed.home(name)), "acme")
    await cli(fed, "workspace", "create", "--home", str(fed.home("spoke-plain")),
              "--tenant", "acme", "w")
    hub = await asyncio.to_thread(local.start, "hub", "hub-plain", "127.0.0.1:0", "--insecure")
    try:
        await asyncio.to_thread(local.trust, "spoke-plain", "hub-plain", hub.peer_address)
        await cli(fed, "grant", "add", "--home", str(fed.home("spoke-plain")), "--peer",
                  "hub-plain", "--tenant", "acme")
        spoke = await asyncio.to_thread(local.start, "spoke", "spoke-plain", "127.0.0.1:0",
                                        "--insecure")
        await asyncio.to_thread(local.trust, "hub-plain", "spoke-plain", spoke.address)
        token = (await cli(fed, "token", "create", "--home", str(fed.home("hub-plain")),
                           "--tenant", "acme")).stdout.strip()
        async with HubClient(hub.address, token) as client:
            agent = await client.spawn(spoke="spoke-plain", workspace="w", template="demo",
                                       task="plain", params={"steps": "1", "interval": "0.05"})
            assert agent.spoke == "spoke-plain"

            async def done() -> bool:
                return state(await client.status(agent.agent_id, live=True)) == "SUCCEEDED"

            await eventually(done, what="the plaintext agent to finish")
        # A plaintext client reaches the spoke: it serves without TLS.
        async with grpc.aio.insecure_channel(spoke.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await wire_pb2_grpc.SpokeServiceStub(channel).Deliver(
                    wire_pb2.SignedEnvelope(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        spoke.stop()
    finally:
        hub.stop()
