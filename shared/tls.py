"""TLS between instances, with certificates Fleetwire makes itself.

Each instance has one self-signed certificate (EC P-256) whose only name is the instance
name. Peers do not use a CA: each side pins the other's certificate, stored in the same
peer record as its signing keys. A connection to a peer trusts that one certificate and
checks the name in it; a server taking peers asks for a client certificate, and the
envelope inbox then checks that the certificate presented is the one recorded for the
envelope's signer.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import ipaddress
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from shared.errors import InvalidArgument, Unauthenticated, Unavailable

CERT_DAYS = 3650
FINGERPRINT_PREFIX = "sha256:"


@functools.lru_cache(maxsize=1024)
def fingerprint(cert_pem: bytes) -> str:
    """sha256:HEX of the certificate's DER bytes (what `--hub-ca sha256:...` pins).
    Cached: the inbox asks for it on every unary message (and once per command
    stream), with the same few certificates."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise InvalidArgument("not a PEM certificate") from None
    return FINGERPRINT_PREFIX + hashlib.sha256(
        cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def check_certificate(cert_pem: bytes, what: str) -> bytes:
    """A single PEM certificate, parsed to be sure; returned as given."""
    try:
        x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise InvalidArgument(
            f"{what} is not a PEM certificate; copy tls.crt from the peer's home folder"
        ) from None
    return cert_pem


def write_private_file(path: Path, data: bytes) -> None:
    """Create path readable and writable by the owner only (0600); never overwrite."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def check_private_file(path: Path, what: str) -> bytes:
    """Read a private key file; refuse one that others can read, saying how to fix it."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InvalidArgument(
            f"{what} {path} does not exist; run `fleetwire init` first") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise InvalidArgument(
            f"{what} {path} is readable by others (mode {stat.S_IMODE(mode):o}); "
            f"fix it with `chmod 600 {path}`")
    return path.read_bytes()


def make_certificate(name: str, key_path: Path, cert_path: Path) -> None:
    """A new key (0600) and a self-signed certificate for instance `name`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(_names(name)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    write_private_file(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _names(name: str) -> list[x509.GeneralName]:
    # The instance name is what peers check (they dial with it as the TLS server name);
    # localhost and the loopback addresses let a CLI on the hub's own machine check the
    # operator API by its address too.
    return [x509.DNSName(name), x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]


@dataclass(frozen=True)
class TlsIdentity:
    """This instance's TLS key and certificate (PEM)."""

    key_pem: bytes
    cert_pem: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert_pem)


def load_tls_identity(key_path: Path, cert_path: Path) -> TlsIdentity:
    key_pem = check_private_file(key_path, "TLS key")
    try:
        cert_pem = cert_path.read_bytes()
    except FileNotFoundError:
        raise InvalidArgument(
            f"TLS certificate {cert_path} does not exist; run `fleetwire init` first"
        ) from None
    return TlsIdentity(key_pem=key_pem, cert_pem=check_certificate(cert_pem, str(cert_path)))


def is_loopback(address: str) -> bool:
    """True for HOST:PORT whose host is a loopback address or `localhost`."""
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def fetch_certificate(address: str, timeout: float = 10.0) -> bytes | None:
    """The certificate a TLS server at HOST:PORT presents (unverified: the caller checks
    it against a pin), or None if it does not speak TLS there. Unavailable if nothing
    answers."""
    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as raw, \
                ctx.wrap_socket(raw, server_hostname=None) as tls:
            der = tls.getpeercert(binary_form=True)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, EOFError):
        return None  # a plaintext gRPC server answers a ClientHello with garbage or a close
    except OSError as exc:
        raise Unavailable(f"cannot reach {address}: {exc.strerror or exc}") from None
    if der is None:
        return None
    return ssl.DER_cert_to_PEM_cert(der).encode()


def pinned_certificate(address: str, pin: str, what: str) -> bytes | None:
    """The server's certificate if its fingerprint is `pin` (sha256:HEX); None if the
    server speaks plaintext; Unauthenticated if it presents another certificate."""
    cert = fetch_certificate(address)
    if cert is None:
        return None
    if fingerprint(cert) != pin:
        raise Unauthenticated(
            f"{what} at {address} presented certificate {fingerprint(cert)}, not the pinned "
            f"{pin}; check the address, or that the pin is this hub's")
    return cert


def certificate_name(cert_pem: bytes) -> str:
    """The instance name a Fleetwire certificate is made out to (its common name)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def self_signed(cert_pem: bytes) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    return cert.issuer == cert.subject
