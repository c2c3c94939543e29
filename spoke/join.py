"""The spoke's side of `fleetwire join`: pin the hub by the token's fingerprint, send a
claim signed with this spoke's key, and record the hub as a peer from its answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import grpc

from shared.audit import ALLOWED, AuditEntry, append_audit
from shared.config import Config
from shared.db.engine import make_engine, make_sessions
from shared.envelope import now_ms
from shared.errors import FleetwireError, InvalidArgument, Unauthenticated, from_rpc_error
from shared.identity import load_identity
from shared.join_token import JOIN_SIGNING_PREFIX, parse_join_token
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.peers import PeerInfo, add_peer, check_address, find_peer
from shared.rpc import open_channel
from shared.tls import (
    certificate_name,
    fingerprint,
    is_loopback,
    load_tls_identity,
    pinned_certificate,
)

JOIN_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Joined:
    hub: PeerInfo
    state: str  # the spoke's state at the hub: ACTIVE, or PENDING until approved


async def join_hub(cfg: Config, hub_address: str, token_text: str, address: str) -> Joined:
    token = parse_join_token(token_text)
    check_address(hub_address)
    if address:
        check_address(address)
    identity = load_identity(cfg.name, cfg.key_path)
    tls = load_tls_identity(cfg.tls_key_path, cfg.tls_cert_path)
    engine = make_engine(cfg.db_url)
    sessions = make_sessions(engine)
    try:
        pinned = await asyncio.to_thread(pinned_certificate, hub_address,
                                         token.hub_fingerprint, "the hub")
        if pinned is None and not is_loopback(hub_address):
            raise InvalidArgument(
                f"the hub at {hub_address} does not speak TLS; a join token is never sent in "
                "plaintext off loopback")
        claim = wire_pb2.JoinClaim(token=token_text.strip(), name=cfg.name,
                                   public_key=identity.public_key, tls_cert=tls.cert_pem,
                                   address=address, issued_at_ms=now_ms())
        raw = claim.SerializeToString()
        request = wire_pb2.JoinRequest(claim=raw,
                                       signature=identity.sign(JOIN_SIGNING_PREFIX + raw))
        creds = grpc.ssl_channel_credentials(root_certificates=pinned) if pinned else None
        async with open_channel(hub_address, cfg.keepalive, creds,
                                server_name=certificate_name(pinned) if pinned else "") as ch:
            try:
                answer = await wire_pb2_grpc.JoinServiceStub(ch).Join(
                    request, timeout=JOIN_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    raise InvalidArgument(
                        f"the hub at {hub_address} does not take joins (it runs --insecure); "
                        "wire the peers by hand with `fleetwire peer add`") from None
                err: FleetwireError = from_rpc_error(exc, target=f"the hub at {hub_address}")
                raise err from None
        # Whatever the transport, the hub's certificate must be the one the token names.
        if fingerprint(answer.tls_cert) != token.hub_fingerprint:
            raise Unauthenticated(
                "the hub answered with a certificate the token does not name; nothing was "
                "recorded here (ask the hub's operator for a new token)")
        hub_at = f"{hub_address.rpartition(':')[0]}:{answer.peer_port}"
        async with sessions() as session, session.begin():
            if await find_peer(session, answer.hub_name) is not None:
                raise InvalidArgument(
                    f"this spoke already has a peer named '{answer.hub_name}'; the hub "
                    f"registered this spoke, but the hub was not recorded here: revoke the old "
                    f"peer first (`fleetwire peer revoke`)")
            info = await add_peer(session, name=answer.hub_name, public_key=answer.public_key,
                                  address=hub_at, tls_cert=answer.tls_cert)
            await append_audit(session, AuditEntry(
                action="peer.join", outcome=ALLOWED, peer=info.name, target=hub_at,
                reason=f"joined hub; key_id {info.key_ids[0]}, TLS {info.tls_fingerprint}; "
                       f"this spoke is {answer.state} there"))
        return Joined(hub=info, state=answer.state)
    finally:
        await engine.dispose()
