"""Joining: a hub's single-use, expiring invitation, and the hub's side of `join`.

The joining spoke pins the hub by the token's fingerprint before it sends anything, and
signs its claim with the key it joins with (shared/join_token.py); the hub checks the
token (known, unused, unexpired, for this name) and registers the spoke with that key
and TLS certificate, in one transaction.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from shared.audit import ALLOWED, REFUSED, AuditEntry, AuditTrail, append_audit
from shared.config import check_name
from shared.db import models
from shared.envelope import now_ms
from shared.errors import FleetwireError, InvalidArgument, Unauthenticated, abort
from shared.identity import Identity
from shared.join_token import JOIN_SIGNING_PREFIX, JoinToken, parse_join_token
from shared.pb.v1 import wire_pb2, wire_pb2_grpc
from shared.peers import ACTIVE, PENDING, PeerInfo, add_peer, find_peer
from shared.tls import TlsIdentity, check_certificate

log = logging.getLogger(__name__)

MAX_TTL_SECONDS = 3600
DEFAULT_TTL_SECONDS = 900
# A signed claim older (or newer) than this is refused: it cannot be kept and replayed.
CLAIM_SKEW_MS = 300_000


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedJoinToken:
    token: JoinToken
    name: str
    expires_at_ms: int
    pending: bool


async def create_join_token(session: AsyncSession, *, name: str, ttl_seconds: float,
                            hub_fingerprint: str, pending: bool) -> IssuedJoinToken:
    check_name("spoke name", name)
    if not 0 < ttl_seconds <= MAX_TTL_SECONDS:
        raise InvalidArgument(
            f"a join token lives at most {MAX_TTL_SECONDS // 60} minutes; ask for a --ttl "
            "up to 1h")
    if await find_peer(session, name) is not None:
        raise InvalidArgument(
            f"a peer named '{name}' is already registered; pick another name (see "
            "`fleetwire peer list`)")
    token = JoinToken(secret=secrets.token_urlsafe(32), hub_fingerprint=hub_fingerprint)
    now = now_ms()
    expires = now + int(ttl_seconds * 1000)
    session.add(models.JoinToken(token_sha256=_digest(token.secret), name=name,
                                 pending=pending, created_at_ms=now, expires_at_ms=expires))
    await session.flush()
    return IssuedJoinToken(token=token, name=name, expires_at_ms=expires, pending=pending)


def open_claim(request: wire_pb2.JoinRequest) -> wire_pb2.JoinClaim:
    """The claim, once its signature verifies under the key it carries."""
    claim = wire_pb2.JoinClaim()
    try:
        claim.ParseFromString(request.claim)
        Ed25519PublicKey.from_public_bytes(claim.public_key).verify(
            request.signature, JOIN_SIGNING_PREFIX + request.claim)
    except (InvalidSignature, ValueError):
        raise Unauthenticated(
            "join refused: the claim is not signed by the key it carries") from None
    return claim


async def accept_join(session: AsyncSession, claim: wire_pb2.JoinClaim, *,
                      hub_fingerprint: str) -> PeerInfo:
    """Register the joining spoke, or refuse and change nothing."""
    if abs(now_ms() - claim.issued_at_ms) > CLAIM_SKEW_MS:
        raise Unauthenticated("join refused: the claim's time is off by more than 5 minutes; "
                              "check the spoke's clock")
    token = parse_join_token(claim.token)
    if token.hub_fingerprint != hub_fingerprint:
        raise Unauthenticated(
            "join refused: the token names another hub certificate; use a token this hub "
            "made")
    row = (await session.execute(select(models.JoinToken).where(
        models.JoinToken.token_sha256 == _digest(token.secret)).with_for_update()
    )).scalar_one_or_none()
    if row is None:
        raise Unauthenticated("join refused: the token is not known to this hub (mistyped or "
                              "made by another hub); create one with `fleetwire join-token "
                              "create`")
    if row.used_at_ms is not None:
        raise Unauthenticated("join refused: the token was already used; tokens are single "
                              "use, create a new one")
    if now_ms() >= row.expires_at_ms:
        raise Unauthenticated("join refused: the token has expired; create a new one")
    if claim.name != row.name:
        raise Unauthenticated(f"join refused: the token is for spoke '{row.name}', not "
                              f"'{claim.name}'; join with --home of that spoke, or create a "
                              "token for this name")
    cert = check_certificate(claim.tls_cert, "the spoke's TLS certificate")
    info = await add_peer(session, name=claim.name, public_key=claim.public_key,
                          address=claim.address, tls_cert=cert,
                          state=PENDING if row.pending else ACTIVE)
    row.used_at_ms = now_ms()
    return info


class JoinService(wire_pb2_grpc.JoinServiceServicer):
    """On the hub's operator port: the join token is the caller's only credential."""

    def __init__(self, trail: AuditTrail, identity: Identity, tls: TlsIdentity,
                 peer_port: Callable[[], int], on_joined: Callable[[], Awaitable[None]]
                 ) -> None:
        self._trail = trail
        self._identity = identity
        self._tls = tls
        self._peer_port = peer_port
        self._on_joined = on_joined

    async def Join(self, request: wire_pb2.JoinRequest,  # noqa: N802 (gRPC method name)
                   context: grpc.aio.ServicerContext) -> wire_pb2.JoinResponse:
        name = ""
        try:
            claim = open_claim(request)
            name = claim.name
            async with self._trail.transaction() as session:
                info = await accept_join(session, claim, hub_fingerprint=self._tls.fingerprint)
                await append_audit(session, AuditEntry(
                    action="peer.join", outcome=ALLOWED, peer=info.name, target=info.name,
                    reason=f"{info.state}; key_id {info.key_ids[0]}, TLS "
                           f"{info.tls_fingerprint}"))
        except FleetwireError as err:
            await self._trail.record(AuditEntry(
                action="peer.join", outcome=REFUSED, peer=name[:64], target=name[:64],
                reason=err.message))
            await abort(context, err)
        log.info("spoke %s joined (%s)", info.name, info.state, extra={"peer": info.name})
        await self._on_joined()
        return wire_pb2.JoinResponse(hub_name=self._identity.name,
                                     public_key=self._identity.public_key,
                                     tls_cert=self._tls.cert_pem,
                                     peer_port=self._peer_port(), state=info.state)
