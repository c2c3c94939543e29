"""seal_envelope / open_envelope: the wire rules of docs/design.md ("The wire")."""

from __future__ import annotations

import hashlib
from dataclasses import replace

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from shared.envelope import (
    MAX_ENVELOPE_BYTES,
    SIGNING_PREFIX,
    OpenedEnvelope,
    PeerKey,
    open_envelope,
    seal_envelope,
)
from shared.errors import InvalidArgument, Unauthenticated
from shared.identity import Identity, key_id_for
from shared.pb.v1 import wire_pb2

NOW = 1_700_000_000_000
HUB = "hub-1"
SPOKE = "spoke-1"


class MemoryKeyring:
    """An in-memory Keyring: key_id -> PeerKey, and a log of the lookups made."""

    def __init__(self, *keys: PeerKey) -> None:
        self.keys = {k.key_id: k for k in keys}
        self.lookups: list[str] = []

    def add(self, key: PeerKey) -> None:
        self.keys[key.key_id] = key

    async def find_key(self, key_id: str) -> PeerKey | None:
        self.lookups.append(key_id)
        return self.keys.get(key_id)


def peer_key(identity: Identity, *, peer_active: bool = True,
             key_active: bool = True, peer_name: str | None = None) -> PeerKey:
    return PeerKey(peer_name=peer_name or identity.name, peer_active=peer_active,
                   key_id=identity.key_id, key_active=key_active,
                   public_key=identity.public_key)


def make_command(tenant: str = "acme") -> wire_pb2.Command:
    return wire_pb2.Command(
        tenant=tenant, workspace="ws",
        principal=wire_pb2.Principal(name="alice", role=wire_pb2.ROLE_OPERATOR),
        list=wire_pb2.ListAgents())


def sign_raw(identity: Identity, raw: bytes, key_id: str | None = None) -> wire_pb2.SignedEnvelope:
    """Sign arbitrary bytes the way seal_envelope does."""
    return wire_pb2.SignedEnvelope(envelope=raw, signature=identity.sign(SIGNING_PREFIX + raw),
                                   key_id=identity.key_id if key_id is None else key_id)


def inner(signed: wire_pb2.SignedEnvelope) -> wire_pb2.Envelope:
    env = wire_pb2.Envelope()
    env.ParseFromString(signed.envelope)
    return env


@pytest.fixture
def hub() -> Identity:
    return Identity(name=HUB, private_key=Ed25519PrivateKey.generate())


@pytest.fixture
def keyring(hub: Identity) -> MemoryKeyring:
    return MemoryKeyring(peer_key(hub))


def seal(hub: Identity, **kw) -> wire_pb2.SignedEnvelope:
    kw.setdefault("recipient", SPOKE)
    kw.setdefault("issued_at_ms", NOW)
    if "response" not in kw:
        kw.setdefault("command", make_command())
    return seal_envelope(hub, **kw)


async def open_(signed, keyring, *, me: str = SPOKE, clock_ms: int = NOW, **kw) -> OpenedEnvelope:
    return await open_envelope(signed, keyring=keyring, me=me, clock_ms=clock_ms, **kw)


# ---------------------------------------------------------------- round trip and format


async def test_round_trip_command(hub: Identity, keyring: MemoryKeyring) -> None:
    cmd = make_command()
    signed = seal(hub, command=cmd, message_id="m-1")
    opened = await open_(signed, keyring)

    env = opened.envelope
    assert env.message_id == "m-1"
    assert env.sender == HUB
    assert env.recipient == SPOKE
    assert env.key_id == hub.key_id
    assert env.issued_at_ms == NOW
    assert env.WhichOneof("body") == "command"
    assert env.command == cmd
    assert opened.raw == signed.envelope
    assert keyring.lookups == [hub.key_id]


async def test_round_trip_response_with_in_reply_to(hub: Identity,
                                                    keyring: MemoryKeyring) -> None:
    resp = wire_pb2.Response(error=wire_pb2.Error(code=wire_pb2.ERROR_CODE_NOT_FOUND,
                                                  message="nope"))
    signed = seal(hub, response=resp, in_reply_to="cmd-7")
    opened = await open_(signed, keyring)
    assert opened.envelope.WhichOneof("body") == "response"
    assert opened.envelope.response == resp
    assert opened.envelope.in_reply_to == "cmd-7"


def test_default_message_id_is_random_128_bit_hex(hub: Identity) -> None:
    ids = {inner(seal(hub)).message_id for _ in range(20)}
    assert len(ids) == 20
    for mid in ids:
        assert len(mid) == 32
        int(mid, 16)


def test_seal_requires_exactly_one_body(hub: Identity) -> None:
    with pytest.raises(ValueError):
        seal_envelope(hub, recipient=SPOKE)
    with pytest.raises(ValueError):
        seal_envelope(hub, recipient=SPOKE, command=make_command(),
                      response=wire_pb2.Response())


def test_signature_is_over_prefix_and_exact_bytes(hub: Identity) -> None:
    signed = seal(hub)
    pub = Ed25519PublicKey.from_public_bytes(hub.public_key)
    # Verifies over the domain-separated exact bytes (raises on failure) ...
    pub.verify(signed.signature, b"fleetwire/v1\x00" + signed.envelope)
    # ... and not over the bare bytes or another prefix.
    with pytest.raises(InvalidSignature):
        pub.verify(signed.signature, signed.envelope)
    with pytest.raises(InvalidSignature):
        pub.verify(signed.signature, b"fleetwire/v2\x00" + signed.envelope)


def test_signatures_are_the_rfc8032_bytes_any_ed25519_library_makes(hub: Identity) -> None:
    """Messages are signed with libsodium (ADR 0022); Ed25519 signing is deterministic,
    so OpenSSL's signature of the same bytes with the same key is identical."""
    for data in (b"", b"fleetwire/v1\x00", SIGNING_PREFIX + seal(hub).envelope):
        assert hub.sign(data) == hub.private_key.sign(data)


def test_key_id_is_first_16_hex_of_sha256_of_raw_public_key(hub: Identity) -> None:
    expected = hashlib.sha256(hub.public_key).hexdigest()[:16]
    assert len(hub.public_key) == 32
    assert hub.key_id == expected == key_id_for(hub.public_key)
    signed = seal(hub)
    assert signed.key_id == expected
    assert inner(signed).key_id == expected


# ---------------------------------------------------------------- keyring rejections


async def test_unknown_key_id_rejected(hub: Identity) -> None:
    with pytest.raises(Unauthenticated, match="unknown key"):
        await open_(seal(hub), MemoryKeyring())


async def test_missing_outer_key_id_rejected(hub: Identity, keyring: MemoryKeyring) -> None:
    signed = seal(hub)
    signed.key_id = ""
    with pytest.raises(Unauthenticated, match="no key_id"):
        await open_(signed, keyring)


async def test_inactive_peer_rejected(hub: Identity) -> None:
    with pytest.raises(Unauthenticated, match="not active"):
        await open_(seal(hub), MemoryKeyring(peer_key(hub, peer_active=False)))


async def test_inactive_key_rejected(hub: Identity) -> None:
    with pytest.raises(Unauthenticated, match="not active"):
        await open_(seal(hub), MemoryKeyring(peer_key(hub, key_active=False)))


async def test_revocation_acts_on_next_message(hub: Identity, keyring: MemoryKeyring) -> None:
    await open_(seal(hub), keyring)
    keyring.add(replace(keyring.keys[hub.key_id], key_active=False))
    with pytest.raises(Unauthenticated):
        await open_(seal(hub), keyring)


# ---------------------------------------------------------------- tampering


async def test_flipped_envelope_byte_rejected(hub: Identity, keyring: MemoryKeyring) -> None:
    signed = seal(hub)
    raw = bytearray(signed.envelope)
    # Flip a byte inside the recipient string so the bytes still parse as an Envelope:
    # only the signature can catch it.
    idx = bytes(raw).index(SPOKE.encode())
    raw[idx] ^= 0x01
    signed.envelope = bytes(raw)
    assert inner(signed).recipient != SPOKE  # still parses
    with pytest.raises(Unauthenticated, match="signature"):
        await open_(signed, keyring, me=inner(signed).recipient)


@pytest.mark.parametrize("position", [0, 31, 63])
async def test_flipped_signature_byte_rejected(hub: Identity, keyring: MemoryKeyring,
                                               position: int) -> None:
    signed = seal(hub)
    sig = bytearray(signed.signature)
    sig[position] ^= 0x80
    signed.signature = bytes(sig)
    with pytest.raises(Unauthenticated, match="signature"):
        await open_(signed, keyring)


async def test_truncated_or_empty_signature_rejected(hub: Identity,
                                                     keyring: MemoryKeyring) -> None:
    signed = seal(hub)
    for sig in (b"", signed.signature[:32]):
        signed.signature = sig
        with pytest.raises(Unauthenticated, match="signature"):
            await open_(signed, keyring)


async def test_signature_by_another_key_rejected(hub: Identity, keyring: MemoryKeyring) -> None:
    """Someone with another key cannot claim the hub's key_id."""
    mallory = Identity(name=HUB, private_key=Ed25519PrivateKey.generate())
    signed = seal(mallory)
    signed.key_id = hub.key_id
    with pytest.raises(Unauthenticated, match="signature"):
        await open_(signed, keyring)


async def test_outer_inner_key_id_mismatch_rejected(hub: Identity) -> None:
    second = Identity(name=HUB, private_key=Ed25519PrivateKey.generate())
    keyring = MemoryKeyring(peer_key(hub), peer_key(second))
    # A correctly signed envelope whose inner key_id names the hub's other key.
    env = wire_pb2.Envelope(message_id="m", sender=HUB, recipient=SPOKE,
                            key_id=second.key_id, issued_at_ms=NOW, command=make_command())
    signed = sign_raw(hub, env.SerializeToString())
    assert signed.key_id == hub.key_id
    with pytest.raises(Unauthenticated, match="key_id disagree"):
        await open_(signed, keyring)


async def test_sender_not_owning_key_rejected(hub: Identity) -> None:
    other = Identity(name="hub-2", private_key=Ed25519PrivateKey.generate())
    keyring = MemoryKeyring(peer_key(hub), peer_key(other))
    # hub signs with its own key but claims to be hub-2.
    env = wire_pb2.Envelope(message_id="m", sender="hub-2", recipient=SPOKE,
                            key_id=hub.key_id, issued_at_ms=NOW, command=make_command())
    with pytest.raises(Unauthenticated, match="does not own"):
        await open_(sign_raw(hub, env.SerializeToString()), keyring)


async def test_key_registered_to_another_peer_rejected(hub: Identity) -> None:
    keyring = MemoryKeyring(peer_key(hub, peer_name="someone-else"))
    with pytest.raises(Unauthenticated, match="does not own"):
        await open_(seal(hub), keyring)


async def test_wrong_recipient_rejected(hub: Identity, keyring: MemoryKeyring) -> None:
    signed = seal(hub, recipient="spoke-2")
    with pytest.raises(Unauthenticated, match="spoke-2"):
        await open_(signed, keyring, me=SPOKE)
    # The intended recipient accepts the very same bytes.
    assert (await open_(signed, keyring, me="spoke-2")).envelope.recipient == "spoke-2"


# ---------------------------------------------------------------- clock window


@pytest.mark.parametrize("offset_ms", [-60_000, 0, 60_000])
async def test_issued_at_within_skew_accepted(hub: Identity, keyring: MemoryKeyring,
                                              offset_ms: int) -> None:
    signed = seal(hub, issued_at_ms=NOW + offset_ms)
    opened = await open_(signed, keyring, clock_ms=NOW)
    assert opened.envelope.issued_at_ms == NOW + offset_ms


async def test_issued_at_too_old_rejected(hub: Identity, keyring: MemoryKeyring) -> None:
    signed = seal(hub, issued_at_ms=NOW - 60_001)
    with pytest.raises(Unauthenticated, match="issued_at"):
        await open_(signed, keyring, clock_ms=NOW)


async def test_issued_at_too_far_in_future_rejected(hub: Identity,
                                                    keyring: MemoryKeyring) -> None:
    signed = seal(hub, issued_at_ms=NOW + 60_001)
    with pytest.raises(Unauthenticated, match="issued_at"):
        await open_(signed, keyring, clock_ms=NOW)


async def test_custom_skew_window(hub: Identity, keyring: MemoryKeyring) -> None:
    signed = seal(hub, issued_at_ms=NOW - 5_000)
    assert await open_(signed, keyring, skew_ms=5_000)
    with pytest.raises(Unauthenticated):
        await open_(signed, keyring, skew_ms=4_999)


# ---------------------------------------------------------------- malformed content


async def test_signed_garbage_is_invalid_argument(hub: Identity,
                                                  keyring: MemoryKeyring) -> None:
    # Field 1, length-delimited, claims 127 bytes but none follow: not an Envelope.
    garbage = b"\x0a\x7f" + b"\xff"
    with pytest.raises(InvalidArgument, match="not an Envelope"):
        await open_(sign_raw(hub, garbage), keyring)


async def test_unsigned_garbage_is_unauthenticated(hub: Identity,
                                                   keyring: MemoryKeyring) -> None:
    """Parsing happens only after verification: unsigned garbage never reaches the parser."""
    signed = wire_pb2.SignedEnvelope(envelope=b"\x0a\x7f\xff", signature=b"\0" * 64,
                                     key_id=hub.key_id)
    with pytest.raises(Unauthenticated, match="signature"):
        await open_(signed, keyring)


async def test_oversized_envelope_is_invalid_argument(hub: Identity,
                                                      keyring: MemoryKeyring) -> None:
    big = make_command(tenant="x" * (MAX_ENVELOPE_BYTES + 1))
    signed = seal(hub, command=big)
    assert len(signed.envelope) > MAX_ENVELOPE_BYTES
    with pytest.raises(InvalidArgument, match="exceeds"):
        await open_(signed, keyring)
    # Refused before any key lookup.
    assert keyring.lookups == []


@pytest.mark.parametrize("message_id", ["", "x" * 65])
async def test_bad_message_id_is_invalid_argument(hub: Identity, keyring: MemoryKeyring,
                                                  message_id: str) -> None:
    env = wire_pb2.Envelope(message_id=message_id, sender=HUB, recipient=SPOKE,
                            key_id=hub.key_id, issued_at_ms=NOW, command=make_command())
    with pytest.raises(InvalidArgument, match="message_id"):
        await open_(sign_raw(hub, env.SerializeToString()), keyring)


# ---------------------------------------------------------------- exact bytes, no re-encoding


async def test_exact_bytes_are_verified_not_a_reencoding(hub: Identity,
                                                         keyring: MemoryKeyring) -> None:
    signed = seal(hub)
    # An unknown field (number 99, varint 1) appended: still a valid Envelope encoding,
    # but different bytes than a re-serialization of the parsed message would give.
    extended = signed.envelope + b"\x98\x06\x01"
    parsed = inner(wire_pb2.SignedEnvelope(envelope=extended))
    assert parsed.SerializeToString() == extended  # the unknown field is kept ...
    parsed.DiscardUnknownFields()
    assert parsed == inner(signed)  # ... and the known content is identical

    # Signed by the sender, the extended bytes are accepted, and raw is exactly them.
    resigned = sign_raw(hub, extended)
    opened = await open_(resigned, keyring)
    assert opened.raw == extended
    assert opened.envelope.message_id == inner(signed).message_id

    # The same bytes under the old signature fail: the signature covers the exact bytes,
    # even where the parsed content would be identical.
    unsigned_change = wire_pb2.SignedEnvelope(envelope=extended, signature=signed.signature,
                                              key_id=signed.key_id)
    with pytest.raises(Unauthenticated, match="signature"):
        await open_(unsigned_change, keyring)
