"""Join tokens: `fwj1.SECRET.FINGERPRINT`. SECRET is 256 random bits (the hub keeps only
its SHA-256); FINGERPRINT is the SHA-256 of the hub's TLS certificate, which the joining
spoke pins before it sends anything."""

from __future__ import annotations

from dataclasses import dataclass

from shared.errors import InvalidArgument
from shared.tls import FINGERPRINT_PREFIX

TOKEN_PREFIX = "fwj1"
JOIN_SIGNING_PREFIX = b"fleetwire/v1/join\x00"


@dataclass(frozen=True)
class JoinToken:
    secret: str
    hub_fingerprint: str  # sha256:HEX

    def __str__(self) -> str:
        return (f"{TOKEN_PREFIX}.{self.secret}."
                f"{self.hub_fingerprint.removeprefix(FINGERPRINT_PREFIX)}")


def parse_join_token(text: str) -> JoinToken:
    parts = text.strip().split(".")
    if (len(parts) != 3 or parts[0] != TOKEN_PREFIX or not parts[1]
            or len(parts[2]) != 64 or any(c not in "0123456789abcdef" for c in parts[2])):
        raise InvalidArgument(
            "that is not a join token (fwj1.<secret>.<hub fingerprint>); copy it whole from "
            "`fleetwire join-token create` on the hub")
    return JoinToken(secret=parts[1], hub_fingerprint=FINGERPRINT_PREFIX + parts[2])
