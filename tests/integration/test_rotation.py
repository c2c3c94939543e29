"""`fleetwire identity rotate` with real daemons: the new key is announced (signed by
the old one) and used at once; the old key works until the grace ends, then is refused;
a peer that was offline learns the key when it is back; at most 3 keys at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import grpc
import pytest

from hub.client import HubClient
from shared.envelope import seal_envelope
from shared.identity import Identity, load_identity, load_private_key
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.rotation import RETIRED_DIR
from tests.conftest import Federation, build_federation
from tests.integration.helpers import eventually, state
from tests.integration.test_join import cli


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A federation of its own: its instances change keys."""
    yield from build_federation(tmp_path_factory.mktemp("rotation"))


async def key_ids(fed: Federation, home: str, peer: str) -> list[str]:
    out = (await cli(fed, "peer", "list", "--home", str(fed.home(home)), "--json")).stdout
    return list(next(p for p in json.loads(out) if p["name"] == peer)["key_ids"])


async def rotate(fed: Federation, home: str, grace: str) -> dict[str, Any]:
    out = (await cli(fed, "identity", "rotate", "--home", str(fed.home(home)), "--grace",
                     grace, "--json")).stdout
    return dict(json.loads(out))


async def heartbeat_signed_by(fed: Federation, spoke: str, signer: Identity
                              ) -> wire_pb2.SignedEnvelope:
    signed = seal_envelope(signer, recipient=fed.hub.name, heartbeat=wire_pb2.Heartbeat())
    async with fed.peer_channel(spoke, fed.hub.name) as channel:
        return await wire_pb2_grpc.HubPeerServiceStub(channel).Deliver(signed, timeout=10)


async def test_spoke_rotation_old_key_works_until_the_grace_ends(fed: Federation) -> None:
    before = load_identity("spoke-a", fed.home("spoke-a") / "identity.key")
    rotated = await rotate(fed, "spoke-a", "6s")
    assert rotated["old_key_id"] == before.key_id
    old = Identity(name="spoke-a", private_key=load_private_key(
        fed.home("spoke-a") / RETIRED_DIR / f"{before.key_id}.key"))

    async def hub_knows_both() -> bool:
        return await key_ids(fed, fed.hub.name, "spoke-a") == [before.key_id,
                                                                rotated["new_key_id"]]

    await eventually(hub_knows_both, what="the hub to learn the spoke's new key")
    # The spoke signs with the new key: its reports keep arriving.
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-a", workspace="research", template="exit-with",
                                task="", params={"code": "0"})

        async def reported() -> bool:
            return state(await hub.status(agent.agent_id)) == "SUCCEEDED"

        await eventually(reported, what="a report signed with the new key")
    # The old key still works during the grace...
    reply = await heartbeat_signed_by(fed, "spoke-a", old)
    assert wire_pb2.Envelope.FromString(reply.envelope).response.HasField("ack")

    # ...and is refused once it is over, for anything, a key announcement included.
    async def old_key_refused() -> bool:
        try:
            await heartbeat_signed_by(fed, "spoke-a", old)
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            return f"key '{before.key_id}' of 'spoke-a' is not active" in (err.details() or "")
        return False

    await eventually(old_key_refused, timeout=20, what="the grace to end")
    forged = seal_envelope(old, recipient=fed.hub.name,
                           key_announcement=wire_pb2.KeyAnnouncement(
                               new_public_key=old.public_key, grace_until_ms=1))
    async with fed.peer_channel("spoke-a", fed.hub.name) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wire_pb2_grpc.HubPeerServiceStub(channel).Deliver(forged, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert await key_ids(fed, fed.hub.name, "spoke-a") == [rotated["new_key_id"]]


async def test_a_spoke_offline_during_a_hub_rotation_learns_the_key_when_back(
        fed: Federation) -> None:
    daemon = fed.spokes["spoke-b"]
    assert await asyncio.to_thread(daemon.stop) == 0
    before = load_identity(fed.hub.name, fed.home(fed.hub.name) / "identity.key")
    rotated = await rotate(fed, fed.hub.name, "1h")

    async def spoke_a_knows() -> bool:
        return rotated["new_key_id"] in await key_ids(fed, "spoke-a", fed.hub.name)

    await eventually(spoke_a_knows, what="the online spoke to learn the hub's new key")
    assert await key_ids(fed, "spoke-b", fed.hub.name) == [before.key_id]

    fed.spokes["spoke-b"] = await asyncio.to_thread(fed.fed.start, "spoke", "spoke-b",
                                                    daemon.address)

    async def spoke_b_knows() -> bool:
        return rotated["new_key_id"] in await key_ids(fed, "spoke-b", fed.hub.name)

    await eventually(spoke_b_knows, what="the returning spoke to learn the hub's new key")
    # The hub's commands, signed with its new key, are taken.
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-b", workspace="lab", template="sleeper",
                                task="", params={})
        assert state(agent) == "RUNNING"
        assert state(await hub.kill(agent.agent_id, grace_ms=2000)) == "KILLED"


async def test_at_most_three_keys_at_once(fed: Federation) -> None:
    home = await asyncio.to_thread(fed.fed.init, "rotator")
    for _ in range(2):
        await cli(fed, "identity", "rotate", "--home", str(home), "--grace", "1h")
    third = await cli(fed, "identity", "rotate", "--home", str(home), "--grace", "1h",
                      check=False)
    assert third.returncode == 6
    assert "already has 3 keys in use" in third.stderr
    bad = await cli(fed, "identity", "rotate", "--home", str(home), "--grace", "soon",
                    check=False)
    assert bad.returncode == 2 and "not a duration" in bad.stderr
