"""The hub's attempts to deliver a command: the same bytes each time, only while the
failure may pass, with the backoff doubling from initial_backoff_seconds. A real gRPC
server on loopback answers UNAVAILABLE (or another code) as often as told."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from hub.dispatch import SpokeDispatcher, _Unreachable
from shared.config import RetryConfig
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from tests.unit.loopback import serving


class Failing(wire_pb2_grpc.SpokeServiceServicer):
    def __init__(self) -> None:
        self.failures: list[grpc.StatusCode] = []
        self.calls: list[tuple[float, bytes]] = []

    async def Deliver(self, request: wire_pb2.SignedEnvelope,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> wire_pb2.SignedEnvelope:
        self.calls.append((time.monotonic(), request.SerializeToString()))
        if self.failures:
            await context.abort(self.failures.pop(0), "told to fail")
        return wire_pb2.SignedEnvelope(envelope=b"answer", key_id="k")


@pytest.fixture
async def spoke() -> AsyncIterator[tuple[Failing, wire_pb2_grpc.SpokeServiceStub]]:
    servicer = Failing()
    async with serving(servicer) as channel:
        yield servicer, wire_pb2_grpc.SpokeServiceStub(channel)


async def _attempts(stub: wire_pb2_grpc.SpokeServiceStub, retry: RetryConfig
                    ) -> wire_pb2.SignedEnvelope:
    # Only the retry settings of the dispatcher take part.
    dispatcher = SimpleNamespace(_cfg=SimpleNamespace(retry=retry))
    return await SpokeDispatcher._attempts(
        dispatcher,  # type: ignore[arg-type]
        lambda signed, timeout: stub.Deliver(signed, timeout=timeout),
        wire_pb2.SignedEnvelope(envelope=b"command", key_id="k"), 5.0)


RETRY = RetryConfig(attempts=4, initial_backoff_seconds=0.05, max_backoff_seconds=0.15)


async def test_a_first_attempt_that_succeeds_is_the_only_one(spoke: tuple[Failing, Any]
                                                             ) -> None:
    servicer, stub = spoke
    assert (await _attempts(stub, RETRY)).envelope == b"answer"
    assert len(servicer.calls) == 1


async def test_unavailable_is_retried_with_the_same_bytes_and_a_doubling_backoff(
        spoke: tuple[Failing, Any]) -> None:
    servicer, stub = spoke
    servicer.failures = [grpc.StatusCode.UNAVAILABLE] * 3
    assert (await _attempts(stub, RETRY)).envelope == b"answer"
    assert len(servicer.calls) == 4
    assert len({sent for _, sent in servicer.calls}) == 1
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(servicer.calls)]
    # 0.05, then 0.1, then 0.2 capped at 0.15 (each gap is the wait plus a round trip).
    for gap, wait in zip(gaps, (0.05, 0.1, 0.15), strict=True):
        assert wait <= gap < wait + 1.0, gaps


async def test_after_the_last_attempt_the_last_failure_is_given(
        spoke: tuple[Failing, Any]) -> None:
    servicer, stub = spoke
    servicer.failures = [grpc.StatusCode.UNAVAILABLE] * 4
    with pytest.raises(_Unreachable) as gave_up:
        await _attempts(stub, RETRY)
    assert len(servicer.calls) == 4
    assert isinstance(gave_up.value.last, grpc.aio.AioRpcError)
    assert gave_up.value.last.code() == grpc.StatusCode.UNAVAILABLE


async def test_with_one_attempt_allowed_nothing_is_retried(spoke: tuple[Failing, Any]) -> None:
    servicer, stub = spoke
    servicer.failures = [grpc.StatusCode.UNAVAILABLE]
    with pytest.raises(_Unreachable):
        await _attempts(stub, RetryConfig(attempts=1))
    assert len(servicer.calls) == 1


@pytest.mark.parametrize("first", [True, False])
async def test_a_failure_a_retry_cannot_mend_is_raised_at_once(
        spoke: tuple[Failing, Any], first: bool) -> None:
    servicer, stub = spoke
    servicer.failures = ([] if first else [grpc.StatusCode.UNAVAILABLE]) + [
        grpc.StatusCode.INVALID_ARGUMENT]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await _attempts(stub, RETRY)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(servicer.calls) == (1 if first else 2)
