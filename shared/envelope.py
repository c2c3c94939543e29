"""Sealing and opening SignedEnvelopes: the wire rules of docs/design.md in one place.

A receiver verifies the exact bytes that travelled, then parses them. Nothing is
re-serialized before verification, so any implementation can check a signature from
the bytes alone.
"""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass
from typing import Protocol

from google.protobuf.message import DecodeError
from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from shared.errors import EnvelopeRejected, InvalidArgument, Unauthenticated, from_wire_error
from shared.identity import Identity
from shared.pb.v1 import wire_pb2

SIGNING_PREFIX = b"fleetwire/v1\x00"
DEFAULT_SKEW_MS = 60_000
MAX_ENVELOPE_BYTES = 256 * 1024


def now_ms() -> int:
    return int(time.time() * 1000)


def new_message_id() -> str:
    """A random 128-bit id as 32 hex digits."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class PeerKey:
    """A public key as the receiver's registry knows it."""

    peer_name: str
    peer_active: bool
    key_id: str
    key_active: bool
    public_key: bytes
    peer_state: str = "ACTIVE"
    # sha256:HEX of the peer's pinned TLS certificate ("" if none is recorded).
    tls_fingerprint: str = ""


class Keyring(Protocol):
    """Where a receiver looks keys up; read per message so revocation acts at once."""

    async def find_key(self, key_id: str) -> PeerKey | None: ...


@dataclass(frozen=True)
class OpenedEnvelope:
    envelope: wire_pb2.Envelope
    # The exact bytes that were verified: what replay memory hashes.
    raw: bytes
    # The signer's pinned TLS certificate (sha256:HEX; "" if none is recorded).
    sender_tls_fingerprint: str = ""


def seal_envelope(
    identity: Identity,
    *,
    recipient: str,
    command: wire_pb2.Command | None = None,
    response: wire_pb2.Response | None = None,
    report: wire_pb2.StatusReport | None = None,
    heartbeat: wire_pb2.Heartbeat | None = None,
    key_announcement: wire_pb2.KeyAnnouncement | None = None,
    in_reply_to: str = "",
    message_id: str | None = None,
    issued_at_ms: int | None = None,
) -> wire_pb2.SignedEnvelope:
    """Serialize an Envelope once and sign those bytes."""
    env = wire_pb2.Envelope(
        message_id=message_id or new_message_id(),
        sender=identity.name,
        recipient=recipient,
        key_id=identity.key_id,
        issued_at_ms=now_ms() if issued_at_ms is None else issued_at_ms,
        in_reply_to=in_reply_to,
    )
    bodies = {"command": command, "response": response, "report": report,
              "heartbeat": heartbeat, "key_announcement": key_announcement}
    given = [(name, body) for name, body in bodies.items() if body is not None]
    if len(given) != 1:
        raise ValueError("an envelope carries exactly one body")
    name, body = given[0]
    getattr(env, name).CopyFrom(body)
    raw = env.SerializeToString()
    return wire_pb2.SignedEnvelope(
        envelope=raw, signature=identity.sign(SIGNING_PREFIX + raw), key_id=identity.key_id
    )


@functools.lru_cache(maxsize=1024)
def _public_key(raw: bytes) -> VerifyKey:
    """A peer's key, made once (a few peers' keys verify every message). Verified with
    libsodium (ADR 0022): half the time of OpenSSL's Ed25519 here, and stricter (it
    also refuses non-canonical and small-order points, which no RFC 8032 signer makes)."""
    return VerifyKey(raw)


async def open_envelope(
    signed: wire_pb2.SignedEnvelope,
    *,
    keyring: Keyring,
    me: str,
    skew_ms: int = DEFAULT_SKEW_MS,
    clock_ms: int | None = None,
) -> OpenedEnvelope:
    """Verify a SignedEnvelope addressed to `me`, then parse it.

    Raises EnvelopeRejected (Unauthenticated, naming the rule) for an unknown or inactive
    sender or key, a key_id mismatch, a bad signature, another recipient, or a timestamp
    outside ±skew_ms; InvalidArgument for bytes that verify but do not parse. Replay
    memory is the caller's next step.
    """
    raw = signed.envelope
    if len(raw) > MAX_ENVELOPE_BYTES:
        raise InvalidArgument(f"envelope of {len(raw)} bytes exceeds {MAX_ENVELOPE_BYTES}")
    if not signed.key_id:
        raise EnvelopeRejected("malformed", "envelope rejected: no key_id")
    key = await keyring.find_key(signed.key_id)
    if key is None:
        raise EnvelopeRejected(
            "unknown_key",
            f"envelope rejected: unknown key '{signed.key_id}'; join the sender "
            "(`fleetwire join`) or add it with `fleetwire peer add`"
        )
    if not key.peer_active:
        raise EnvelopeRejected(
            "inactive_sender",
            f"envelope rejected: peer '{key.peer_name}' is {key.peer_state.lower()}, not "
            "active; see `fleetwire peer list`")
    if not key.key_active:
        raise EnvelopeRejected(
            "inactive_sender",
            f"envelope rejected: key '{key.key_id}' of '{key.peer_name}' is not active"
        )
    try:
        _public_key(key.public_key).verify(SIGNING_PREFIX + raw, signed.signature)
    except (BadSignatureError, ValueError):
        raise EnvelopeRejected("bad_signature",
                               "envelope rejected: signature does not verify") from None

    env = wire_pb2.Envelope()
    try:
        env.ParseFromString(raw)
    except DecodeError:
        raise InvalidArgument("envelope rejected: signed bytes are not an Envelope") from None
    if env.key_id != signed.key_id:
        raise EnvelopeRejected("sender_mismatch",
                               "envelope rejected: inner and outer key_id disagree")
    if env.sender != key.peer_name:
        raise EnvelopeRejected(
            "sender_mismatch",
            f"envelope rejected: sender '{env.sender}' does not own key '{key.key_id}'"
        )
    if env.recipient != me:
        raise EnvelopeRejected(
            "wrong_recipient",
            f"envelope rejected: addressed to '{env.recipient}', this instance is '{me}'"
        )
    now = now_ms() if clock_ms is None else clock_ms
    if abs(now - env.issued_at_ms) > skew_ms:
        raise EnvelopeRejected(
            "skew",
            f"envelope rejected: issued_at is {(env.issued_at_ms - now) / 1000:+.1f} s from "
            f"this instance's clock (allowed ±{skew_ms / 1000:.0f} s); check both clocks"
        )
    if not env.message_id or len(env.message_id) > 64:
        raise InvalidArgument("envelope rejected: message_id must be 1 to 64 characters")
    return OpenedEnvelope(envelope=env, raw=raw, sender_tls_fingerprint=key.tls_fingerprint)


async def open_reply(
    reply: wire_pb2.SignedEnvelope, *, keyring: Keyring, me: str, peer: str,
    message_id: str, skew_ms: int = DEFAULT_SKEW_MS,
) -> wire_pb2.Response:
    """The Response in `peer`'s signed answer to our `message_id` (docs/design.md, rule 4:
    verified, then sender and in_reply_to checked). Unauthenticated if it is not that;
    the peer's signed Error is raised as the error it carries."""
    env = (await open_envelope(reply, keyring=keyring, me=me, skew_ms=skew_ms)).envelope
    if (env.sender != peer or env.in_reply_to != message_id
            or env.WhichOneof("body") != "response"):
        raise Unauthenticated(f"the answer is not '{peer}''s signed reply to message "
                              f"{message_id}")
    if env.response.WhichOneof("result") == "error":
        raise from_wire_error(env.response.error)
    return env.response
