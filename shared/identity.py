"""An instance's Ed25519 signing identity and the key_id rule shared by every peer."""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from nacl.signing import SigningKey

from shared.errors import InvalidArgument


def key_id_for(public_key: bytes) -> str:
    """First 16 hex digits of SHA-256 of the raw 32-byte public key (docs/design.md, rule 5)."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def decode_public_key(text: str) -> bytes:
    """Base64 of a raw 32-byte Ed25519 public key, checked, as bytes."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument(f"public key is not valid base64: {exc}") from None
    if len(raw) != 32:
        raise InvalidArgument(
            f"public key must be 32 raw bytes (base64 of an Ed25519 key), got {len(raw)}; "
            "copy it from `fleetwire identity show`"
        )
    Ed25519PublicKey.from_public_bytes(raw)
    return raw


def public_bytes(key: Ed25519PrivateKey) -> bytes:
    """The raw 32-byte public key of a private key."""
    return key.public_key().public_bytes(serialization.Encoding.Raw,
                                         serialization.PublicFormat.Raw)


class Identity:
    """This instance's name and current signing key. A running daemon switches to a new
    key in place (`use`) after `fleetwire identity rotate`, so everything holding the
    identity signs with the new key from then on."""

    def __init__(self, name: str, private_key: Ed25519PrivateKey) -> None:
        self.name = name
        self.use(private_key)

    def use(self, private_key: Ed25519PrivateKey) -> None:
        self.private_key = private_key
        self.public_key: bytes = public_bytes(private_key)
        self.key_id: str = key_id_for(self.public_key)
        # Messages are signed with libsodium (ADR 0022): Ed25519 signing is
        # deterministic (RFC 8032), so the signature is the same bytes, made in about
        # two thirds of the time.
        self._signer = SigningKey(private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption()))

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode()

    def sign(self, data: bytes) -> bytes:
        return self._signer.sign(data).signature


def generate_key_file(path: Path) -> None:
    """Write a new Ed25519 private key, readable by the owner only (0600)."""
    write_key_file(path, Ed25519PrivateKey.generate())


def write_key_file(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 signing key file; refuse one that others can read."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InvalidArgument(
            f"identity key {path} does not exist; run `fleetwire init` first"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidArgument(
            f"identity key {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
            f"fix it with `chmod 600 {path}`"
        )
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"identity key {path} is not an Ed25519 key")
    return key


def load_identity(name: str, path: Path) -> Identity:
    return Identity(name=name, private_key=load_private_key(path))
