"""The peer registry: other instances, their signing keys, and the keyring view of them."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.config import check_name
from shared.db import models
from shared.envelope import PeerKey, now_ms
from shared.errors import InvalidArgument
from shared.identity import key_id_for

ACTIVE = "ACTIVE"


@dataclass(frozen=True)
class PeerInfo:
    name: str
    address: str
    state: str
    key_ids: tuple[str, ...]


async def add_peer(
    session: AsyncSession, *, name: str, public_key: bytes, address: str = ""
) -> PeerInfo:
    """Register a peer with one active key; an existing name is refused."""
    check_name("peer name", name)
    if address:
        check_address(address)
    key_id = key_id_for(public_key)
    peer = models.Peer(name=name, address=address, state=ACTIVE, created_at_ms=now_ms())
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
    return PeerInfo(name=name, address=address, state=ACTIVE, key_ids=(key_id,))


async def list_peers(session: AsyncSession) -> list[PeerInfo]:
    rows = (await session.execute(
        select(models.Peer, models.PeerKey.key_id)
        .join(models.PeerKey, models.PeerKey.peer_id == models.Peer.id, isouter=True)
        .order_by(models.Peer.name))).all()
    by_name: dict[str, PeerInfo] = {}
    for peer, key_id in rows:
        info = by_name.get(peer.name) or PeerInfo(peer.name, peer.address, peer.state, ())
        by_name[peer.name] = PeerInfo(info.name, info.address, info.state,
                                      info.key_ids + ((key_id,) if key_id else ()))
    return list(by_name.values())


async def find_peer(session: AsyncSession, name: str) -> models.Peer | None:
    return (await session.execute(
        select(models.Peer).where(models.Peer.name == name))).scalar_one_or_none()


def check_address(address: str) -> str:
    """HOST:PORT with a numeric port; [v6]:PORT allowed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise InvalidArgument(f"address '{address}' is not HOST:PORT (e.g. 127.0.0.1:7401)")
    return address


class DbKeyring:
    """Keyring over the peer tables, read per message so changes act at once."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions

    async def find_key(self, key_id: str) -> PeerKey | None:
        async with self._sessions() as session:
            row = (await session.execute(
                select(models.PeerKey, models.Peer)
                .join(models.Peer, models.Peer.id == models.PeerKey.peer_id)
                .where(models.PeerKey.key_id == key_id))).first()
        if row is None:
            return None
        key, peer = row
        return PeerKey(peer_name=peer.name, peer_active=peer.state == ACTIVE,
                       key_id=key.key_id, key_active=key.state == ACTIVE,
                       public_key=key.public_key)
