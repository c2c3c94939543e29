"""Joining a spoke to a hub with a single-use token: the happy path over mutual TLS, and
every refusal (reused, expired, wrong name, tampered, malformed), none of which
registers anything on either side."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from hub.client import HubClient
from shared.envelope import now_ms
from shared.identity import load_identity
from shared.join_token import JOIN_SIGNING_PREFIX
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from tests.conftest import TEST_HEARTBEAT_SECONDS, TEST_TEMPLATES, Federation, build_federation
from tests.integration.helpers import eventually, state


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A federation of its own: these tests join spokes others must not see."""
    yield from build_federation(tmp_path_factory.mktemp("join"))


def new_spoke(fed: Federation, name: str) -> Path:
    """A fresh spoke home with tenant acme / workspace w; not known to the hub."""
    home = fed.fed.init(name)
    config = home / "config.toml"
    config.write_text(config.read_text().replace(
        "heartbeat_seconds = 5", f"heartbeat_seconds = {TEST_HEARTBEAT_SECONDS}"))
    with open(config, "a") as f:
        f.write(TEST_TEMPLATES)
    fed.fed.cli("tenant", "create", "--home", str(home), "acme")
    fed.fed.cli("workspace", "create", "--home", str(home), "--tenant", "acme", "w")
    return home


async def cli(fed: Federation, *args: str, check: bool = True,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`fleetwire ARGS` (in a thread: the command line runs its own event loop)."""
    return await asyncio.to_thread(fed.fed.cli, *args, check=check, show=False, env=env)


async def join_token(fed: Federation, name: str, *extra: str) -> dict[str, str]:
    out = (await cli(fed, "join-token", "create", "--home", str(fed.home(fed.hub.name)),
                     "--name", name, "--json", *extra)).stdout
    return dict(json.loads(out))


async def join(fed: Federation, name: str, token: str, hub: str | None = None
               ) -> subprocess.CompletedProcess[str]:
    return await cli(fed, "join", "--home", str(fed.home(name)), "--hub",
                     hub or fed.hub.address, "--token", token, check=False)


async def peers(fed: Federation, home_name: str) -> dict[str, dict[str, Any]]:
    out = (await cli(fed, "peer", "list", "--home", str(fed.home(home_name)), "--json")).stdout
    return {p["name"]: p for p in json.loads(out)}


async def assert_nothing_registered(fed: Federation, spoke: str) -> None:
    assert spoke not in await peers(fed, fed.hub.name)
    assert fed.hub.name not in await peers(fed, spoke)


async def test_join_then_spawn_over_mutual_tls(fed: Federation) -> None:
    home = await asyncio.to_thread(new_spoke, fed, "spoke-j")
    token = await join_token(fed, "spoke-j")
    joined = await join(fed, "spoke-j", token["token"])
    assert joined.returncode == 0, joined.stderr
    assert "this spoke is ACTIVE there" in joined.stdout

    hub_side, spoke_side = await peers(fed, fed.hub.name), await peers(fed, "spoke-j")
    spoke_id = load_identity("spoke-j", home / "identity.key")
    assert hub_side["spoke-j"]["state"] == "ACTIVE"
    assert hub_side["spoke-j"]["key_ids"] == [spoke_id.key_id]
    assert hub_side["spoke-j"]["tls_fingerprint"] == json.loads((await cli(
        fed, "identity", "show", "--home", str(home), "--json")).stdout)["tls_fingerprint"]
    assert spoke_side[fed.hub.name]["tls_fingerprint"] == token["hub_fingerprint"]
    assert spoke_side[fed.hub.name]["address"] == fed.hub.peer_address

    # Grants stay the spoke's decision; then it runs, and tells the hub where it is.
    await cli(fed, "grant", "add", "--home", str(home), "--peer", fed.hub.name,
                "--tenant", "acme", "--max-role", "operator")
    fed.spokes["spoke-j"] = await asyncio.to_thread(fed.fed.start, "spoke", "spoke-j")
    async def address_known() -> bool:
        return bool((await peers(fed, fed.hub.name))["spoke-j"]["address"]
                    == fed.spokes["spoke-j"].address)

    await eventually(address_known, what="the spoke's address at the hub")
    async with HubClient(fed.hub.address, fed.tokens["acme"]) as hub:
        agent = await hub.spawn(spoke="spoke-j", workspace="w", template="sleeper",
                                task="joined", params={})
        assert state(agent) == "RUNNING"
        killed = await hub.kill(agent.agent_id, grace_ms=2000)
        assert state(killed) == "KILLED"


@pytest.mark.parametrize("case", ["reused", "expired", "wrong name", "tampered secret",
                                  "tampered fingerprint"])
async def test_a_bad_token_is_refused_and_registers_nothing(fed: Federation, case: str) -> None:
    name = f"spoke-{case.replace(' ', '-')}"
    await asyncio.to_thread(new_spoke, fed, name)
    if case == "reused":
        # Spent by the spoke it was made for; then presented again from another home.
        await asyncio.to_thread(new_spoke, fed, f"{name}-first")
        token = (await join_token(fed, f"{name}-first"))["token"]
        assert (await join(fed, f"{name}-first", token)).returncode == 0
        expected = "already used"
    elif case == "expired":
        issued = await join_token(fed, name, "--ttl", "1s")
        token = issued["token"]
        deadline = now_ms() + 1000
        await eventually(lambda: now_ms() > deadline + 50, what="the token to expire")
        expected = "expired"
    elif case == "wrong name":
        token = (await join_token(fed, "spoke-someone-else"))["token"]
        expected = "is for spoke 'spoke-someone-else'"
    elif case == "tampered secret":
        prefix, secret, fp = (await join_token(fed, name))["token"].split(".")
        token = f"{prefix}.{secret[:-2]}{'AA' if secret[-2:] != 'AA' else 'BB'}.{fp}"
        expected = "not known to this hub"
    else:
        prefix, secret, fp = (await join_token(fed, name))["token"].split(".")
        token = f"{prefix}.{secret}.{'0' * 64}"
        expected = "another hub certificate"
    result = await join(fed, name, token)
    assert result.returncode == 5, result.stdout + result.stderr
    assert expected in result.stderr
    await assert_nothing_registered(fed, name)


async def test_a_malformed_token_is_an_argument_error(fed: Federation) -> None:
    await asyncio.to_thread(new_spoke, fed, "spoke-malformed")
    result = await join(fed, "spoke-malformed", "not-a-token")
    assert result.returncode == 2 and "not a join token" in result.stderr
    await assert_nothing_registered(fed, "spoke-malformed")


async def test_a_claim_not_signed_by_its_key_is_refused(fed: Federation) -> None:
    """The wire itself: a claim carrying one key but signed by another registers nothing."""
    home = await asyncio.to_thread(new_spoke, fed, "spoke-forged")
    other = await asyncio.to_thread(new_spoke, fed, "spoke-forger")
    token = (await join_token(fed, "spoke-forged"))["token"]
    victim = load_identity("spoke-forged", home / "identity.key")
    forger = load_identity("spoke-forger", other / "identity.key")
    claim = wire_pb2.JoinClaim(token=token, name="spoke-forged", public_key=victim.public_key,
                               tls_cert=(home / "tls.crt").read_bytes(),
                               issued_at_ms=now_ms()).SerializeToString()
    async with grpc.aio.insecure_channel(fed.hub.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await wire_pb2_grpc.JoinServiceStub(channel).Join(wire_pb2.JoinRequest(
                claim=claim, signature=forger.sign(JOIN_SIGNING_PREFIX + claim)), timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "not signed by the key it carries" in (err.value.details() or "")
    assert "spoke-forged" not in await peers(fed, fed.hub.name)
    # The token was not spent by the forgery.
    assert (await join(fed, "spoke-forged", token)).returncode == 0


async def test_a_pending_join_is_refused_until_resumed(fed: Federation) -> None:
    home = await asyncio.to_thread(new_spoke, fed, "spoke-p")
    token = (await join_token(fed, "spoke-p", "--pending"))["token"]
    joined = await join(fed, "spoke-p", token)
    assert joined.returncode == 0 and "PENDING" in joined.stdout
    assert (await peers(fed, fed.hub.name))["spoke-p"]["state"] == "PENDING"
    await cli(fed, "grant", "add", "--home", str(home), "--peer", fed.hub.name,
                "--tenant", "acme", "--max-role", "operator")
    daemon = await asyncio.to_thread(fed.fed.start, "spoke", "spoke-p")
    fed.spokes["spoke-p"] = daemon
    # Its heartbeats are refused while PENDING (and audited): the hub never learns its
    # address.
    async def refused() -> bool:
        records = json.loads((await cli(fed, "audit", "list", "--home",
                                        str(fed.home(fed.hub.name)), "--json")).stdout)
        return any("'spoke-p' is pending, not active" in r["reason"] for r in records)

    await eventually(refused, what="the hub to refuse the pending spoke's heartbeat")
    assert (await peers(fed, fed.hub.name))["spoke-p"]["address"] == ""
    resumed = await cli(fed, "peer", "resume", "--home", str(fed.home(fed.hub.name)), "spoke-p")
    assert "now ACTIVE" in resumed.stdout
    async def accepted() -> bool:
        return bool((await peers(fed, fed.hub.name))["spoke-p"]["address"] == daemon.address)

    await eventually(accepted, what="the resumed spoke's heartbeat to be accepted")


async def test_join_pins_a_tls_hub_before_sending_the_token(fed: Federation) -> None:
    """Against a hub whose operator port speaks TLS, a token naming another certificate
    never leaves the spoke: the handshake's certificate is checked first."""
    hub = await asyncio.to_thread(fed.fed.start, "hub", fed.hub.name, "127.0.0.1:0",
                                  "--operator-tls", "--peer-listen", "127.0.0.1:0")
    try:
        await asyncio.to_thread(new_spoke, fed, "spoke-tls")
        good = (await join_token(fed, "spoke-tls"))["token"]
        prefix, secret, _ = good.split(".")
        started = time.monotonic()
        result = await join(fed, "spoke-tls", f"{prefix}.{secret}.{'1' * 64}",
                                         hub.address)
        assert result.returncode == 5 and "not the pinned" in result.stderr
        assert time.monotonic() - started < 30
        await assert_nothing_registered(fed, "spoke-tls")
        ok = await join(fed, "spoke-tls", good, hub.address)
        assert ok.returncode == 0, ok.stderr
        assert (await peers(fed, "spoke-tls"))[fed.hub.name]["address"] == hub.peer_address
    finally:
        hub.stop()
