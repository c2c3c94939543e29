"""Rotating this instance's signing key, and telling every peer about it.

`fleetwire identity rotate` makes a new key the current one and keeps the old one under
retired-keys/ (0600). The running daemon notices the new key file and signs with it from
then on; its announcer sends each ACTIVE peer a KeyAnnouncement signed by the old key
(still valid there) and repeats it, every second, until that peer acknowledges it or the
grace period ends, so a peer that was offline learns the key when it is back. A peer
accepts messages signed by either key until the grace ends, then only by the new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from shared.audit import ALLOWED, AuditEntry, AuditTrail, append_audit
from shared.config import Config
from shared.db import models
from shared.envelope import Keyring, OpenedEnvelope, now_ms, open_reply, seal_envelope
from shared.errors import FleetwireError, InvalidArgument, ResourceExhausted
from shared.identity import (
    Identity,
    key_id_for,
    load_private_key,
    public_bytes,
    write_key_file,
)
from shared.pb.v1 import wire_pb2
from shared.peers import ACTIVE, MAX_ACTIVE_KEYS, MAX_KEY_GRACE_MS, accept_key_announcement
from shared.rpc import PeerChannels

log = logging.getLogger(__name__)

RETIRED_DIR = "retired-keys"
ANNOUNCE_SECONDS = 1.0
ANNOUNCE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class Rotated:
    old_key_id: str
    new_key_id: str
    grace_until_ms: int


async def rotate_key(session: AsyncSession, cfg: Config, grace_seconds: float) -> Rotated:
    """Make a new signing key current; the old one stays valid at peers for the grace."""
    grace_ms = int(grace_seconds * 1000)
    if not 0 < grace_ms <= MAX_KEY_GRACE_MS:
        raise InvalidArgument("--grace must be more than 0 and at most 30d")
    now = now_ms()
    in_grace = list((await session.execute(
        select(models.KeyRotation).where(models.KeyRotation.grace_until_ms > now)
        .order_by(models.KeyRotation.grace_until_ms))).scalars())
    if len(in_grace) + 1 >= MAX_ACTIVE_KEYS:
        ends = in_grace[0].grace_until_ms
        raise ResourceExhausted(
            f"this instance already has {MAX_ACTIVE_KEYS} keys in use (the current one and "
            f"{len(in_grace)} in their grace period); rotate again after "
            f"{(ends - now) // 1000 + 1} s, when the oldest grace ends",
            retry_after_ms=ends - now)
    old = load_private_key(cfg.key_path)
    old_id = key_id_for(public_bytes(old))
    retired = cfg.home / RETIRED_DIR
    retired.mkdir(mode=0o700, exist_ok=True)
    kept = retired / f"{old_id}.key"
    if not kept.exists():
        write_key_file(kept, old)
    new = Ed25519PrivateKey.generate()
    staged = cfg.home / "identity.key.new"
    staged.unlink(missing_ok=True)
    write_key_file(staged, new)
    rotated = Rotated(old_key_id=old_id, new_key_id=key_id_for(public_bytes(new)),
                      grace_until_ms=now + grace_ms)
    session.add(models.KeyRotation(old_key_id=old_id, new_key_id=rotated.new_key_id,
                                   new_public_key=public_bytes(new), grace_until_ms=now + grace_ms,
                                   created_at_ms=now))
    await session.flush()
    os.replace(staged, cfg.key_path)  # the switch itself, atomic
    return rotated


async def take_announcement(trail: AuditTrail, opened: OpenedEnvelope) -> wire_pb2.Response:
    """The receiving side: record a verified peer's new key (its answer is an Ack)."""
    env = opened.envelope
    async with trail.transaction() as session:
        new_id = await accept_key_announcement(
            session, sender=env.sender, signed_by=env.key_id,
            announcement=env.key_announcement, now=now_ms())
        await append_audit(session, AuditEntry(
            action="peer.key_rotated", outcome=ALLOWED, peer=env.sender, target=new_id,
            message_id=env.message_id,
            reason=f"new key {new_id}; key {env.key_id} valid until "
                   f"{env.key_announcement.grace_until_ms} (Unix ms)"))
    return wire_pb2.Response(ack=wire_pb2.Ack())


class _Deliver(Protocol):
    def Deliver(self, request: wire_pb2.SignedEnvelope, *,  # noqa: N802
                timeout: float) -> Any: ...


class KeyAnnouncer:
    """In each daemon: follows the key file, and tells peers about rotations."""

    def __init__(self, cfg: Config, identity: Identity, keyring: Keyring,
                 sessions: async_sessionmaker[AsyncSession], trail: AuditTrail,
                 channels: PeerChannels, stub: Callable[[grpc.aio.Channel], _Deliver]) -> None:
        self._cfg = cfg
        self._identity = identity
        self._keyring = keyring
        self._sessions = sessions
        self._trail = trail
        self._channels = channels
        self._stub = stub
        self._key_mtime = self._mtime()
        # Whether a rotation may be in its grace: true at start and after the key file
        # changes; false once a round found none (then a round is one stat() call).
        self._maybe_pending = True

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("key announcement round failed")
            await asyncio.sleep(ANNOUNCE_SECONDS)

    def _mtime(self) -> int:
        try:
            return self._cfg.key_path.stat().st_mtime_ns
        except FileNotFoundError:
            return 0

    def follow_key_file(self) -> None:
        """Sign with the key `identity rotate` made current, from the next message on."""
        mtime = self._mtime()
        if mtime == self._key_mtime:
            return
        self._key_mtime = mtime
        self._maybe_pending = True
        key = load_private_key(self._cfg.key_path)
        if key_id_for(public_bytes(key)) != self._identity.key_id:
            old = self._identity.key_id
            self._identity.use(key)
            log.info("signing key rotated: %s -> %s", old, self._identity.key_id)

    async def tick(self) -> None:
        self.follow_key_file()
        if not self._maybe_pending:
            return
        now = now_ms()
        async with self._sessions() as session:
            rotations = list((await session.execute(
                select(models.KeyRotation).where(models.KeyRotation.grace_until_ms > now)
                .order_by(models.KeyRotation.id))).scalars())
            if not rotations:
                self._maybe_pending = False
                return
            acked = set((await session.execute(
                select(models.KeyAnnouncement.rotation_id, models.KeyAnnouncement.peer)
            )).tuples())
            peers = list((await session.execute(
                select(models.Peer.name, models.Peer.address)
                .where(models.Peer.state == ACTIVE, models.Peer.address != ""))).tuples())
        # While a rotation is in its grace, every round looks again: a peer may come
        # back, be resumed or get an address.
        for rotation in rotations:
            for name, address in peers:
                if (rotation.id, name) in acked:
                    continue
                try:
                    await self._announce(rotation, name, address)
                except (FleetwireError, grpc.aio.AioRpcError) as exc:
                    detail = exc.message if isinstance(exc, FleetwireError) else exc.details()
                    log.info("key %s not yet announced to %s (%s); retrying",
                             rotation.new_key_id, name, detail)

    async def _announce(self, rotation: models.KeyRotation, peer: str, address: str) -> None:
        old = load_private_key(self._cfg.home / RETIRED_DIR / f"{rotation.old_key_id}.key")
        signed = seal_envelope(
            Identity(name=self._identity.name, private_key=old), recipient=peer,
            key_announcement=wire_pb2.KeyAnnouncement(
                new_public_key=rotation.new_public_key,
                grace_until_ms=rotation.grace_until_ms))
        message_id = wire_pb2.Envelope.FromString(signed.envelope).message_id
        stub = self._stub(await self._channels.get(peer, address))
        reply = await stub.Deliver(signed, timeout=ANNOUNCE_TIMEOUT_SECONDS)
        response = await open_reply(
            reply, keyring=self._keyring, me=self._identity.name, peer=peer,
            message_id=message_id, skew_ms=self._cfg.wire.max_clock_skew_seconds * 1000)
        if response.WhichOneof("result") != "ack":
            raise InvalidArgument("the answer is not an acknowledgement")
        async with self._trail.transaction() as session:
            session.add(models.KeyAnnouncement(rotation_id=rotation.id, peer=peer,
                                               acked_at_ms=now_ms()))
            await append_audit(session, AuditEntry(
                action="identity.announced", outcome=ALLOWED, peer=peer,
                target=rotation.new_key_id, message_id=message_id,
                reason=f"{peer} acknowledged key {rotation.new_key_id}"))
        log.info("key %s announced to %s", rotation.new_key_id, peer)
