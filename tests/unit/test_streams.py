"""The hub's Exchange streams (hub/streams.py) against a real grpc.aio server on
loopback that answers deliveries as a test tells it: answers matched by number in any
order, refusals and timeouts that end one delivery and not the stream, a stream that
ends failing what waits on it as retryable, and unary Deliver for a spoke without
Exchange."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest

from hub.streams import SpokeStreams
from shared.errors import RETRY_AFTER_KEY
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from tests.unit.loopback import serving


@dataclass
class Scripted(wire_pb2_grpc.SpokeServiceServicer):
    """Answers a delivery whose envelope is b"hold" only when released; b"refuse" with a
    refusal; b"end" by ending the stream; anything else at once, echoing it."""

    streams: int = 0
    unary: int = 0
    serve_exchange: bool = True
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def Deliver(self, request: wire_pb2.SignedEnvelope,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> wire_pb2.SignedEnvelope:
        self.unary += 1
        return wire_pb2.SignedEnvelope(envelope=b"unary:" + request.envelope)

    async def Exchange(self, deliveries: AsyncIterator[wire_pb2.Delivery],  # noqa: N802
                       context: grpc.aio.ServicerContext) -> None:
        self.streams += 1
        if not self.serve_exchange:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        writing = asyncio.Lock()
        tasks = set()

        async def answer(delivery: wire_pb2.Delivery) -> None:
            body = delivery.envelope.envelope
            if body == b"hold":
                await self.release.wait()
            if body == b"refuse":
                frame = wire_pb2.Delivered(call=delivery.call, refusal=wire_pb2.Refusal(
                    status=grpc.StatusCode.NOT_FOUND.value[0], message="no such agent",
                    retry_after_ms=250))
            else:
                frame = wire_pb2.Delivered(call=delivery.call, envelope=delivery.envelope)
            async with writing:
                await context.write(frame)

        async for delivery in deliveries:
            if delivery.envelope.envelope == b"end":
                return
            task = asyncio.ensure_future(answer(delivery))
            tasks.add(task)
            task.add_done_callback(tasks.discard)


@pytest.fixture
async def spoke() -> AsyncIterator[tuple[Scripted, grpc.aio.Channel]]:
    servicer = Scripted()
    async with serving(servicer) as channel:
        try:
            yield servicer, channel
        finally:
            servicer.release.set()


@pytest.fixture
async def streams() -> AsyncIterator[SpokeStreams]:
    opened = SpokeStreams()
    try:
        yield opened
    finally:
        await opened.close()


def _signed(body: bytes) -> wire_pb2.SignedEnvelope:
    return wire_pb2.SignedEnvelope(envelope=body, key_id="k")


async def test_answers_are_matched_by_number_in_any_order_on_one_stream(
        spoke: tuple[Scripted, grpc.aio.Channel], streams: SpokeStreams) -> None:
    servicer, channel = spoke
    held = asyncio.ensure_future(streams.deliver("s", channel, _signed(b"hold"), 10))
    quick = [await streams.deliver("s", channel, _signed(b"q%d" % i), 10)
             for i in range(5)]
    # Five answers came back while the first delivery still waits for its own.
    assert [q.envelope for q in quick] == [b"q%d" % i for i in range(5)]
    assert not held.done()
    servicer.release.set()
    assert (await held).envelope == b"hold"
    concurrent = await asyncio.gather(*(
        streams.deliver("s", channel, _signed(b"c%d" % i), 10) for i in range(50)))
    assert [c.envelope for c in concurrent] == [b"c%d" % i for i in range(50)]
    assert (servicer.streams, servicer.unary) == (1, 0)


async def test_a_refusal_is_the_status_a_unary_call_would_end_with_and_the_stream_stays(
        spoke: tuple[Scripted, grpc.aio.Channel], streams: SpokeStreams) -> None:
    servicer, channel = spoke
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await streams.deliver("s", channel, _signed(b"refuse"), 10)
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    assert refused.value.details() == "no such agent"
    assert (RETRY_AFTER_KEY, "250") in tuple(refused.value.trailing_metadata())
    assert (await streams.deliver("s", channel, _signed(b"next"), 10)).envelope == b"next"
    assert servicer.streams == 1


async def test_a_timeout_ends_that_delivery_only(
        spoke: tuple[Scripted, grpc.aio.Channel], streams: SpokeStreams) -> None:
    servicer, channel = spoke
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await streams.deliver("s", channel, _signed(b"hold"), 0.2)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert (await streams.deliver("s", channel, _signed(b"next"), 10)).envelope == b"next"
    assert servicer.streams == 1


async def test_a_stream_that_ends_fails_what_waits_as_unavailable_and_the_next_opens_anew(
        spoke: tuple[Scripted, grpc.aio.Channel], streams: SpokeStreams) -> None:
    servicer, channel = spoke
    held = asyncio.ensure_future(streams.deliver("s", channel, _signed(b"hold"), 10))
    assert (await streams.deliver("s", channel, _signed(b"q"), 10)).envelope == b"q"
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await streams.deliver("s", channel, _signed(b"end"), 10)
    # UNAVAILABLE: what the dispatcher retries, with the same bytes.
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as waiting:
        await held
    assert waiting.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (await streams.deliver("s", channel, _signed(b"again"), 10)).envelope == b"again"
    assert servicer.streams == 2


async def test_a_spoke_without_exchange_is_sent_unary_calls_and_asked_once(
        spoke: tuple[Scripted, grpc.aio.Channel], streams: SpokeStreams) -> None:
    servicer, channel = spoke
    servicer.serve_exchange = False
    for i in range(3):
        reply = await streams.deliver("s", channel, _signed(b"u%d" % i), 10)
        assert reply.envelope == b"unary:u%d" % i
    assert (servicer.streams, servicer.unary) == (1, 3)


async def test_closing_fails_what_waits_as_unavailable(
        spoke: tuple[Scripted, grpc.aio.Channel], streams: SpokeStreams) -> None:
    _, channel = spoke
    held = asyncio.ensure_future(streams.deliver("s", channel, _signed(b"hold"), 10))
    assert (await streams.deliver("s", channel, _signed(b"q"), 10)).envelope == b"q"
    await streams.close()
    with pytest.raises(grpc.aio.AioRpcError) as closed:
        await held
    assert closed.value.code() == grpc.StatusCode.UNAVAILABLE
