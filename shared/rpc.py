"""The one server factory and the one channel factory, with matching options, and the
transport between instances: mutual TLS with pinned certificates (or plaintext, only
with --insecure and only on loopback)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.config import KeepAliveConfig
from shared.db import models
from shared.errors import InvalidArgument, Unavailable
from shared.peers import REVOKED, check_address
from shared.tls import TlsIdentity, is_loopback

log = logging.getLogger(__name__)

# How often a daemon re-reads its peers' pinned certificates (the envelope check reads
# the peer record on every message, so this only bounds when a new peer can connect).
CERT_REFRESH_SECONDS = 1.0

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


@dataclass(frozen=True)
class Listen:
    """One address to serve on; credentials None means plaintext (loopback only)."""

    address: str
    credentials: grpc.ServerCredentials | None


def refuse_plaintext_off_loopback(address: str, what: str) -> None:
    if not is_loopback(address):
        raise InvalidArgument(
            f"refusing to serve {what} in plaintext on {address}: plaintext is only allowed "
            "on loopback (127.0.0.1, ::1, localhost); drop --insecure to use TLS, or listen "
            "on a loopback address")


async def start_server(
    listens: list[Listen],
    register: list[Callable[[grpc.aio.Server], None]],
    keepalive: KeepAliveConfig,
) -> tuple[grpc.aio.Server, list[int]]:
    """Build, bind and start a grpc.aio server; returns it and the bound ports."""
    server = grpc.aio.server(options=server_options(keepalive))
    for add in register:
        add(server)
    ports = []
    for listen in listens:
        check_address(listen.address)
        try:
            port = (server.add_insecure_port(listen.address) if listen.credentials is None
                    else server.add_secure_port(listen.address, listen.credentials))
        except RuntimeError as exc:
            raise InvalidArgument(f"cannot listen on {listen.address}: {exc}") from None
        if port == 0:
            raise InvalidArgument(
                f"cannot listen on {listen.address}: address in use or not local")
        ports.append(port)
    await server.start()
    return server, ports


def open_channel(address: str, keepalive: KeepAliveConfig,
                 credentials: grpc.ChannelCredentials | None = None,
                 server_name: str = "") -> grpc.aio.Channel:
    check_address(address)
    options = channel_options(keepalive)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    if server_name:
        # Pinned self-signed certificates name the instance, not the host it runs on.
        options.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(address, credentials, options=options)


class PeerCerts:
    """The pinned TLS certificates of this instance's peers (all but revoked ones), kept
    in memory from the peer table: what its mTLS server trusts and what its channels to
    each peer check."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], own: TlsIdentity) -> None:
        self._sessions = sessions
        self.own = own
        self._certs: dict[str, bytes] = {}
        self._served: bytes | None = None

    async def refresh(self) -> None:
        async with self._sessions() as session:
            rows = (await session.execute(
                select(models.Peer.name, models.Peer.tls_cert)
                .where(models.Peer.state != REVOKED, models.Peer.tls_cert.is_not(None))
            )).all()
        self._certs = {name: cert for name, cert in rows if cert is not None}

    async def keep_fresh(self) -> None:
        while True:
            await asyncio.sleep(CERT_REFRESH_SECONDS)
            try:
                await self.refresh()
            except Exception:
                log.exception("reading peer certificates failed")

    def get(self, peer: str) -> bytes | None:
        return self._certs.get(peer)

    def _roots(self) -> bytes:
        # Never empty (gRPC needs a root to ask for client certificates): our own
        # certificate is always there; only we hold its key.
        return b"".join([self.own.cert_pem, *sorted(self._certs.values())])

    def _config(self) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(self.own.key_pem, self.own.cert_pem)], root_certificates=self._roots())

    def mutual_tls(self) -> grpc.ServerCredentials:
        """Server credentials that require a client certificate of a known peer; the
        trusted set follows the peer table without a restart."""

        def fetch() -> grpc.ServerCertificateConfiguration | None:
            # Called by gRPC before each new connection's handshake.
            roots = self._roots()
            if roots == self._served:
                return None
            self._served = roots
            return self._config()

        self._served = self._roots()
        return grpc.dynamic_ssl_server_credentials(self._config(), fetch,
                                                   require_client_authentication=True)

    def server_tls(self) -> grpc.ServerCredentials:
        """Server TLS without client certificates (the hub's operator API)."""
        return grpc.ssl_server_credentials([(self.own.key_pem, self.own.cert_pem)])

    def channel_credentials(self, peer: str) -> grpc.ChannelCredentials:
        cert = self.get(peer)
        if cert is None:
            raise Unavailable(
                f"no TLS certificate is recorded for peer '{peer}'; join it with "
                "`fleetwire join`, or add it with `fleetwire peer add --tls-cert`")
        return grpc.ssl_channel_credentials(root_certificates=cert,
                                            private_key=self.own.key_pem,
                                            certificate_chain=self.own.cert_pem)


class PeerChannels:
    """One channel per peer, reused across calls; replaced (and the old one closed) when
    the peer's address or pinned certificate changes. certs None: plaintext."""

    def __init__(self, keepalive: KeepAliveConfig, certs: PeerCerts | None) -> None:
        self._keepalive = keepalive
        self._certs = certs
        self._channels: dict[str, tuple[tuple[str, bytes], grpc.aio.Channel]] = {}

    async def get(self, peer: str, address: str) -> grpc.aio.Channel:
        certs = self._certs
        if certs is not None and certs.get(peer) is None:
            await certs.refresh()  # a peer added a moment ago
        cert = certs.get(peer) if certs is not None else None
        known = self._channels.get(peer)
        if known is None or known[0] != (address, cert or b""):
            if known is not None:
                asyncio.get_running_loop().create_task(known[1].close())
            creds = certs.channel_credentials(peer) if certs is not None else None
            known = ((address, cert or b""),
                     open_channel(address, self._keepalive, creds, server_name=peer))
            self._channels[peer] = known
        return known[1]

    async def close(self) -> None:
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()
