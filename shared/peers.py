"""The peer registry: other instances, their signing keys, and the keyring view of them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import bindparam, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.config import check_name
from shared.db import models
from shared.envelope import PeerKey, now_ms
from shared.errors import InvalidArgument, NotFound, ResourceExhausted
from shared.identity import key_id_for
from shared.pb.v1 import wire_pb2
from shared.security_view import SecurityView
from shared.tls import fingerprint

# Peer states. Only an ACTIVE peer's messages are accepted; REVOKED is for good.
PENDING = "PENDING"
ACTIVE = "ACTIVE"
SUSPENDED = "SUSPENDED"
REVOKED = "REVOKED"

# A peer may have this many signing keys in use at once (current + rotated-away ones
# still in their grace period).
MAX_ACTIVE_KEYS = 3
# The longest grace a peer may ask for its old key; a longer one is cut to this.
MAX_KEY_GRACE_MS = 30 * 86_400_000


@dataclass(frozen=True)
class PeerInfo:
    name: str
    address: str
    state: str
    key_ids: tuple[str, ...]
    tls_fingerprint: str = ""


@dataclass(frozen=True)
class _KeyRecord:
    """What the registry holds of a key; whether it is in use is decided per message."""

    peer_name: str
    peer_state: str
    key_id: str
    state: str
    expires_at_ms: int | None
    public_key: bytes
    tls_fingerprint: str


def key_in_use(key: models.PeerKey | _KeyRecord, now: int) -> bool:
    """Active, and not past the grace period of a rotation away from it."""
    return key.state == ACTIVE and (key.expires_at_ms is None or now < key.expires_at_ms)


async def add_peer(
    session: AsyncSession, *, name: str, public_key: bytes, address: str = "",
    tls_cert: bytes | None = None, state: str = ACTIVE,
) -> PeerInfo:
    """Register a peer with one active key (and its pinned TLS certificate); an existing
    name or key is refused."""
    check_name("peer name", name)
    if address:
        check_address(address)
    key_id = key_id_for(public_key)
    peer = models.Peer(name=name, address=address, state=state, created_at_ms=now_ms(),
                       tls_cert=tls_cert)
    session.add(peer)
    try:
        await session.flush()
        session.add(models.PeerKey(peer_id=peer.id, key_id=key_id, public_key=public_key,
                                   state=ACTIVE, created_at_ms=now_ms()))
        await session.flush()
    except IntegrityError:
        raise InvalidArgument(
            f"peer '{name}' or key '{key_id}' is already registered; see `fleetwire peer list`"
        ) from None
    return PeerInfo(name=name, address=address, state=state, key_ids=(key_id,),
                    tls_fingerprint=fingerprint(tls_cert) if tls_cert else "")


async def list_peers(session: AsyncSession, now: int | None = None) -> list[PeerInfo]:
    """Every peer with the keys it may sign with now."""
    at = now_ms() if now is None else now
    rows = (await session.execute(
        select(models.Peer, models.PeerKey)
        .join(models.PeerKey, models.PeerKey.peer_id == models.Peer.id, isouter=True)
        .order_by(models.Peer.name, models.PeerKey.id))).all()
    by_name: dict[str, PeerInfo] = {}
    for peer, key in rows:
        info = by_name.get(peer.name) or PeerInfo(
            peer.name, peer.address, peer.state, (),
            fingerprint(peer.tls_cert) if peer.tls_cert else "")
        in_use = key is not None and key_in_use(key, at)
        by_name[peer.name] = PeerInfo(info.name, info.address, info.state,
                                      info.key_ids + ((key.key_id,) if in_use else ()),
                                      info.tls_fingerprint)
    return list(by_name.values())


# What each state change needs the peer to be in now.
_MOVES: dict[str, tuple[str, frozenset[str]]] = {
    "suspend": (SUSPENDED, frozenset({PENDING, ACTIVE})),
    "resume": (ACTIVE, frozenset({PENDING, SUSPENDED})),
    "revoke": (REVOKED, frozenset({PENDING, ACTIVE, SUSPENDED})),
}


async def change_peer_state(session: AsyncSession, name: str, move: str) -> PeerInfo:
    """suspend | resume | revoke a peer. Acts on the peer's next message: every message
    is checked against the peer record, so no restart is needed."""
    target, allowed = _MOVES[move]
    peer = await find_peer(session, name)
    if peer is None:
        raise NotFound(f"no peer '{name}'; see `fleetwire peer list`")
    if peer.state not in allowed:
        hint = ("revocation is for good: join it again under a new name"
                if peer.state == REVOKED else f"it is already {peer.state.lower()}")
        raise InvalidArgument(f"cannot {move} peer '{name}': {hint}")
    peer.state = target
    if target == REVOKED:
        keys = (await session.execute(
            select(models.PeerKey).where(models.PeerKey.peer_id == peer.id))).scalars()
        for key in keys:
            key.state = REVOKED
    await session.flush()
    return (await _info(session, peer))


async def _info(session: AsyncSession, peer: models.Peer) -> PeerInfo:
    return next(p for p in await list_peers(session) if p.name == peer.name)


async def find_peer(session: AsyncSession, name: str) -> models.Peer | None:
    return (await session.execute(
        select(models.Peer).where(models.Peer.name == name))).scalar_one_or_none()


def check_address(address: str) -> str:
    """HOST:PORT with a numeric port; [v6]:PORT allowed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"address '{address}' is not HOST:PORT (e.g. 127.0.0.1:7401)")
    return address


# Built once: a statement built per message costs more than the query it runs.
_KEY_AND_PEER = (select(models.PeerKey, models.Peer)
                 .join(models.Peer, models.Peer.id == models.PeerKey.peer_id)
                 .where(models.PeerKey.key_id == bindparam("b_key_id")))


class DbKeyring:
    """Keyring over the peer tables. What it reads is kept while the security epoch
    stands (shared/security_view.py), so a change acts on the next message."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession],
                 clock_ms: Callable[[], int] = now_ms, *,
                 view: SecurityView | None = None) -> None:
        self._sessions = sessions
        self._clock_ms = clock_ms
        self.view = view or SecurityView(sessions)

    async def find_key(self, key_id: str) -> PeerKey | None:
        found = await self.view.lookup(("key", key_id), lambda: self._read(key_id))
        if found is None:
            return None
        return PeerKey(peer_name=found.peer_name, peer_active=found.peer_state == ACTIVE,
                       key_id=found.key_id, key_active=key_in_use(found, self._clock_ms()),
                       public_key=found.public_key, peer_state=found.peer_state,
                       tls_fingerprint=found.tls_fingerprint)

    async def _read(self, key_id: str) -> _KeyRecord | None:
        async with self._sessions() as session:
            row = (await session.execute(_KEY_AND_PEER, {"b_key_id": key_id})).first()
        if row is None:
            return None
        key, peer = row
        return _KeyRecord(peer_name=peer.name, peer_state=peer.state, key_id=key.key_id,
                          state=key.state, expires_at_ms=key.expires_at_ms,
                          public_key=key.public_key,
                          tls_fingerprint=fingerprint(peer.tls_cert) if peer.tls_cert else "")


async def accept_key_announcement(session: AsyncSession, *, sender: str, signed_by: str,
                                  announcement: wire_pb2.KeyAnnouncement, now: int) -> str:
    """A verified peer's news that it signs with a new key from now on: record the key,
    and end the signing key's validity at the grace the peer asked for (at most
    MAX_KEY_GRACE_MS). Repeats are harmless. Returns the new key_id."""
    try:
        Ed25519PublicKey.from_public_bytes(announcement.new_public_key)
    except ValueError:
        raise InvalidArgument("key announcement refused: the new key is not a 32-byte "
                              "Ed25519 public key") from None
    new_id = key_id_for(announcement.new_public_key)
    peer = await find_peer(session, sender)
    if peer is None:  # verified just now; only a concurrent revoke-and-delete gets here
        raise NotFound(f"no peer '{sender}'")
    keys = list((await session.execute(
        select(models.PeerKey).where(models.PeerKey.peer_id == peer.id))).scalars())
    signing = next(k for k in keys if k.key_id == signed_by)
    until = min(announcement.grace_until_ms, now + MAX_KEY_GRACE_MS)
    known = next((k for k in keys if k.key_id == new_id), None)
    if known is None:
        taken = (await session.execute(select(models.PeerKey.id).where(
            models.PeerKey.key_id == new_id))).first()
        if taken is not None:
            raise InvalidArgument(f"key announcement refused: key {new_id} belongs to "
                                  "another peer")
        in_use = [k for k in keys if key_in_use(k, now)]
        if len(in_use) >= MAX_ACTIVE_KEYS:
            raise ResourceExhausted(
                f"key announcement refused: '{sender}' already has {MAX_ACTIVE_KEYS} keys "
                "in use; rotate again once the oldest one's grace period has ended")
        session.add(models.PeerKey(peer_id=peer.id, key_id=new_id,
                                   public_key=announcement.new_public_key, state=ACTIVE,
                                   created_at_ms=now))
    elif known.state != ACTIVE:
        raise InvalidArgument(f"key announcement refused: key {new_id} was revoked")
    if signing.key_id != new_id and (signing.expires_at_ms is None
                                     or until < signing.expires_at_ms):
        signing.expires_at_ms = until
    await session.flush()
    return new_id
