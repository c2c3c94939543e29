"""A SpokeService servicer served by a real grpc.aio server on loopback, and a channel
to it (for the tests of what the hub does with a spoke's answers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from shared.pb.v1 import wire_pb2_grpc


@asynccontextmanager
async def serving(servicer: wire_pb2_grpc.SpokeServiceServicer
                  ) -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server()
    wire_pb2_grpc.add_SpokeServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel
    finally:
        await server.stop(0)
