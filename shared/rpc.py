"""The one server factory and the one channel factory, with matching options."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

from shared.config import KeepAliveConfig
from shared.errors import InvalidArgument
from shared.peers import check_address

# Envelopes and agent lists are small; anything near this is abuse, refused by gRPC itself.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024


def _common_options(keepalive: KeepAliveConfig) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", keepalive.interval_ms),
        ("grpc.keepalive_timeout_ms", keepalive.timeout_ms),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(keepalive: KeepAliveConfig) -> list[tuple[str, Any]]:
    return [
        *_common_options(keepalive),
        ("grpc.so_reuseport", 0),
        # Accept client pings as often as clients are configured to send them.
        ("grpc.http2.min_ping_interval_without_data_ms", keepalive.interval_ms),
    ]


def channel_options(keepalive: KeepAliveConfig) -> list[tuple[str, Any]]:
    return [
        *_common_options(keepalive),
        # Reconnect quickly so a retry after a restart is not held by a long backoff.
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),
    ]


async def start_server(
    listen: str,
    register: list[Callable[[grpc.aio.Server], None]],
    keepalive: KeepAliveConfig,
) -> tuple[grpc.aio.Server, int]:
    """Build, bind and start a grpc.aio server; returns it and the bound port."""
    check_address(listen)
    server = grpc.aio.server(options=server_options(keepalive))
    for add in register:
        add(server)
    try:
        port = server.add_insecure_port(listen)
    except RuntimeError as exc:
        raise InvalidArgument(f"cannot listen on {listen}: {exc}") from None
    if port == 0:
        raise InvalidArgument(f"cannot listen on {listen}: address in use or not local")
    await server.start()
    return server, port


def open_channel(address: str, keepalive: KeepAliveConfig) -> grpc.aio.Channel:
    check_address(address)
    return grpc.aio.insecure_channel(address, options=channel_options(keepalive))


class PeerChannels:
    """One channel per peer, reused across calls; replaced (and the old one closed) when
    the peer's address changes."""

    def __init__(self, keepalive: KeepAliveConfig) -> None:
        self._keepalive = keepalive
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}

    def get(self, peer: str, address: str) -> grpc.aio.Channel:
        known = self._channels.get(peer)
        if known is None or known[0] != address:
            if known is not None:
                asyncio.get_running_loop().create_task(known[1].close())
            known = (address, open_channel(address, self._keepalive))
            self._channels[peer] = known
        return known[1]

    async def close(self) -> None:
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()
