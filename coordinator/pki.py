"""The fleet's TLS certificates: one CA per fleet, a broker server certificate, device client certificates.

Made with `cryptography` (no openssl binary needed): ECDSA P-256 keys, SHA-256 signatures. The CA
key stays in the coordinator's state (0600); devices get the CA certificate to check the broker, and,
when asked, a client certificate whose common name is their agent id. TLS is the transport's
protection; who a message is from is still decided by the device's Ed25519 key (`provision.py`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedclip.sdk.errors import ConfigError
from fedclip.sdk.fsutil import atomic_write

CA_DAYS = 3650
LEAF_DAYS = 825  # the longest leaf lifetime common TLS clients still accept


@dataclass(frozen=True)
class CertPair:
    cert_pem: bytes
    key_pem: bytes

    def write(self, cert: Path, key: Path) -> None:
        atomic_write(cert, self.cert_pem, mode=0o644)
        atomic_write(key, self.key_pem, mode=0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _builder(subject: str, issuer: x509.Name, public_key, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        # An hour of slack: a device whose clock is a little behind still accepts a fresh cert.
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
    )


def make_ca(fleet: str) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(f"fedclip {fleet} CA")
    cert = (
        _builder(f"fedclip {fleet} CA", name, key.public_key(), CA_DAYS)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


class CertificateAuthority:
    """The fleet CA loaded from its two PEM files; issues server and client certificates."""

    def __init__(self, cert_path: Path, key_path: Path):
        try:
            self.cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise ConfigError(f"fleet CA: cannot load {cert_path} / {key_path} ({e})") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"fleet CA: {key_path} is not an EC private key")
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def _leaf(self, cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> CertPair:
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            _builder(cn, self.cert.subject, key.public_key(), LEAF_DAYS)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False
            )
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = b.sign(self.key, hashes.SHA256())
        return CertPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def server(self, hosts: list[str]) -> CertPair:
        """A broker certificate valid for each of `hosts` (IP addresses or DNS names)."""
        if not hosts:
            raise ConfigError("broker certificate: give at least one host name or address")
        sans: list[x509.GeneralName] = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        return self._leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def client(self, agent_id: str) -> CertPair:
        return self._leaf(agent_id, ExtendedKeyUsageOID.CLIENT_AUTH, [])


__all__ = ["CertPair", "CertificateAuthority", "make_ca"]
