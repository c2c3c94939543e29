"""Key rotation at the receiving end, over a real (migrated) SQLite database and a clock
the test controls: both keys verify during the grace period, only the new one after,
at most three keys at once, and nothing signed by an expired key gets through."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.envelope import open_envelope, seal_envelope
from shared.errors import InvalidArgument, ResourceExhausted, Unauthenticated
from shared.identity import Identity
from shared.pb.v1 import wire_pb2
from shared.peers import DbKeyring, accept_key_announcement, add_peer, list_peers

T0 = 1_900_000_000_000
GRACE_MS = 60_000
PEER, ME = "spoke-1", "hub-1"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


def new_key() -> Identity:
    return Identity(name=PEER, private_key=Ed25519PrivateKey.generate())


async def announce(sessions: async_sessionmaker[AsyncSession], signer: Identity,
                   new: Identity, now: int, grace_ms: int = GRACE_MS) -> str:
    async with sessions() as session, session.begin():
        return await accept_key_announcement(
            session, sender=PEER, signed_by=signer.key_id, now=now,
            announcement=wire_pb2.KeyAnnouncement(new_public_key=new.public_key,
                                                  grace_until_ms=now + grace_ms))


async def verifies(keyring: DbKeyring, signer: Identity, clock: Clock) -> bool:
    signed = seal_envelope(signer, recipient=ME, heartbeat=wire_pb2.Heartbeat(),
                           issued_at_ms=clock.now)
    try:
        await open_envelope(signed, keyring=keyring, me=ME, clock_ms=clock.now)
    except Unauthenticated as err:
        assert "is not active" in err.message
        return False
    return True


async def test_both_keys_verify_during_the_grace_then_only_the_new(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    old, new, clock = new_key(), new_key(), Clock()
    async with sessions() as session, session.begin():
        await add_peer(session, name=PEER, public_key=old.public_key)
    keyring = DbKeyring(sessions, clock_ms=clock)
    assert await announce(sessions, old, new, clock.now) == new.key_id

    clock.now = T0 + GRACE_MS - 1
    assert await verifies(keyring, old, clock) and await verifies(keyring, new, clock)
    async with sessions() as session:
        listed = await list_peers(session, now=clock.now)
    assert listed[0].key_ids == (old.key_id, new.key_id)

    clock.now = T0 + GRACE_MS
    assert not await verifies(keyring, old, clock)
    assert await verifies(keyring, new, clock)
    async with sessions() as session:
        listed = await list_peers(session, now=clock.now)
    assert listed[0].key_ids == (new.key_id,)


async def test_repeats_are_harmless_and_a_fourth_key_is_refused(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    k1, k2, k3, k4 = new_key(), new_key(), new_key(), new_key()
    async with sessions() as session, session.begin():
        await add_peer(session, name=PEER, public_key=k1.public_key)
    await announce(sessions, k1, k2, T0)
    await announce(sessions, k1, k2, T0 + 10)  # the retried announcement
    await announce(sessions, k2, k3, T0 + 20)
    with pytest.raises(ResourceExhausted) as err:
        await announce(sessions, k3, k4, T0 + 30)
    assert "already has 3 keys in use" in err.value.message
    # Once the oldest grace is over there is room again.
    assert await announce(sessions, k3, k4, T0 + GRACE_MS + 1) == k4.key_id


async def test_a_grace_is_never_lengthened_and_is_capped(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    old, new, clock = new_key(), new_key(), Clock()
    async with sessions() as session, session.begin():
        await add_peer(session, name=PEER, public_key=old.public_key)
    keyring = DbKeyring(sessions, clock_ms=clock)
    await announce(sessions, old, new, T0, grace_ms=1000)
    await announce(sessions, old, new, T0, grace_ms=10**12)  # a later, longer ask
    clock.now = T0 + 1000
    assert not await verifies(keyring, old, clock)


async def test_a_key_of_another_peer_or_not_a_key_is_refused(
        sessions: async_sessionmaker[AsyncSession]) -> None:
    mine, theirs = new_key(), Identity(name="spoke-2", private_key=Ed25519PrivateKey.generate())
    async with sessions() as session, session.begin():
        await add_peer(session, name=PEER, public_key=mine.public_key)
        await add_peer(session, name="spoke-2", public_key=theirs.public_key)
    with pytest.raises(InvalidArgument, match="belongs to another peer"):
        await announce(sessions, mine, theirs, T0)
    async with sessions() as session, session.begin():
        with pytest.raises(InvalidArgument, match="not a 32-byte Ed25519 public key"):
            await accept_key_announcement(
                session, sender=PEER, signed_by=mine.key_id, now=T0,
                announcement=wire_pb2.KeyAnnouncement(new_public_key=b"short",
                                                      grace_until_ms=T0 + 1))
