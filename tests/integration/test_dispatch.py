"""The hub's dispatch under failure: lost answers are retried with the same signed bytes
(one agent, not two), and an unreachable spoke answers UNAVAILABLE in bounded time."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import grpc
import pytest

from hub.client import HubClient
from shared.errors import Unavailable
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from tests.conftest import Federation, build_federation
from tests.integration.helpers import processes_with_marker, state


@pytest.fixture(scope="module")
def isolated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    """A federation of its own: these tests add spokes that others must not see."""
    yield from build_federation(tmp_path_factory.mktemp("isolated"))


class AnswerLosingProxy(wire_pb2_grpc.SpokeServiceServicer):
    """Forwards to the real spoke, but drops the first `lose` answers (UNAVAILABLE). It
    terminates TLS with the spoke's own certificate and goes on with the hub's, so both
    ends see the identities they pinned."""

    def __init__(self, fed: Federation, spoke: str, lose: int) -> None:
        self.fed = fed
        self.spoke = spoke
        self.lose = lose
        self.envelopes: list[bytes] = []

    async def Deliver(self, request: wire_pb2.SignedEnvelope,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> wire_pb2.SignedEnvelope:
        self.envelopes.append(request.SerializeToString())
        async with self.fed.peer_channel(self.fed.hub.name, self.spoke) as channel:
            reply = await wire_pb2_grpc.SpokeServiceStub(channel).Deliver(request, timeout=20)
        if self.lose > 0:
            self.lose -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "answer lost on the way back")
        return reply


async def test_lost_answer_is_retried_with_same_bytes_and_spawns_once(
        isolated: Federation) -> None:
    await asyncio.to_thread(isolated.add_spoke, "spoke-flaky", tenants={"acme": ["research"]},
                            start=False)
    home = isolated.home("spoke-flaky")
    proxy = AnswerLosingProxy(isolated, "spoke-flaky", lose=2)
    server = grpc.aio.server()
    wire_pb2_grpc.add_SpokeServiceServicer_to_server(proxy, server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [((home / "tls.key").read_bytes(), (home / "tls.crt").read_bytes())]))
    await server.start()
    try:
        # Heartbeats tell the hub where the spoke is: here, the proxy.
        daemon = await asyncio.to_thread(isolated.fed.start, "spoke", "spoke-flaky",
                                         "127.0.0.1:0", "--advertise", f"127.0.0.1:{port}")
        isolated.spokes["spoke-flaky"] = daemon
        await asyncio.to_thread(isolated.fed.trust, isolated.hub.name, "spoke-flaky",
                                f"127.0.0.1:{port}")
        async with HubClient(isolated.hub.address, isolated.tokens["acme"]) as hub:
            agent = await hub.spawn(spoke="spoke-flaky", workspace="research",
                                    template="sleeper", task="once", params={})
            assert state(agent) == "RUNNING"
            assert len(proxy.envelopes) == 3, "two lost answers, then one delivered"
            assert len(set(proxy.envelopes)) == 1, "every retry re-sent the same bytes"
            assert len(processes_with_marker(agent.agent_id)) == 1
            listed = await hub.list(spoke="spoke-flaky")
            assert [a.agent_id for a in listed.agents] == [agent.agent_id]
            await hub.kill(agent.agent_id, grace_ms=2000)
    finally:
        await server.stop(0)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_unreachable_spoke_is_unavailable_in_bounded_time(isolated: Federation) -> None:
    await asyncio.to_thread(isolated.add_spoke, "spoke-dead", tenants={"acme": ["research"]},
                            start=False)
    await asyncio.to_thread(isolated.fed.trust, isolated.hub.name, "spoke-dead",
                            f"127.0.0.1:{_closed_port()}")
    async with HubClient(isolated.hub.address, isolated.tokens["acme"]) as hub:
        started = time.monotonic()
        with pytest.raises(Unavailable) as err:
            await hub.spawn(spoke="spoke-dead", workspace="research", template="sleeper",
                            task="", params={})
        assert time.monotonic() - started < 20
        assert "spoke-dead" in err.value.message and "unreachable" in err.value.message
        # The failed spawn left nothing behind, and a live listing names the dead spoke.
        listed = await hub.list(live=True)
        assert "spoke-dead" in listed.unreachable_spokes
        assert all(a.spoke != "spoke-dead" for a in listed.agents)
        assert all(a.spoke != "spoke-dead" for a in (await hub.list()).agents)
        with pytest.raises(Unavailable):
            await hub.list(spoke="spoke-dead", live=True)
