"""Ed25519 signatures: the coordinator signs adapters and rollout commands, agents verify them.

The coordinator makes its key pair at first start (`ensure_keypair`); the public key goes into each
agent's config. Whoever can publish on the broker still cannot push an adapter: an agent acts only on
messages whose signature verifies under that public key.

A signed message is an ordinary wire message (`fedclip.sdk.wire`) whose body carries `signature`:
Ed25519 over the canonical JSON of the envelope fields (body without `signature`) and the sha256 of
the tensors, so neither the envelope nor a single tensor byte can change without the signature
failing. `sent_at` is fixed before signing because `wire.encode` would otherwise stamp it afterwards.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedclip.sdk.errors import ConfigError, WireError
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.wire import Envelope, Message, tensors_digest

SIGNATURE_FIELD = "signature"
PRIVATE_KEY_NAME = "coordinator_ed25519.pem"
PUBLIC_KEY_NAME = "coordinator_ed25519.pub.pem"

__all__ = [
    "Ed25519PrivateKey",
    "Ed25519PublicKey",
    "generate_key",
    "save_private_key",
    "save_public_key",
    "load_private_key",
    "load_public_key",
    "ensure_keypair",
    "sign",
    "verify",
    "sign_envelope",
    "verify_message",
    "signed_bytes",
]


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def save_private_key(key: Ed25519PrivateKey, path: str | Path) -> Path:
    path = Path(path)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(path, pem, mode=0o600)  # 0600 from creation: never world-readable, even briefly
    return path


def save_public_key(key: Ed25519PublicKey | Ed25519PrivateKey, path: str | Path) -> Path:
    path = Path(path)
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return atomic_write(path, pem, mode=0o644)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {path} ({e.strerror or e})") from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(_read(path, "private key"), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(
            f"private key: {path} is not an unencrypted PEM private key ({_first_line(e)})"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"private key: {path} is a {type(key).__name__}, expected an Ed25519 key")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(_read(path, "public key"))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"public key: {path} is not a PEM public key ({_first_line(e)})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key: {path} is a {type(key).__name__}, expected an Ed25519 key")
    return key


def ensure_keypair(key_dir: str | Path) -> tuple[Ed25519PrivateKey, Path]:
    """Load the coordinator's key from `key_dir`, making it on first start. Returns (key, public path)."""
    key_dir = Path(key_dir)
    priv, pub = key_dir / PRIVATE_KEY_NAME, key_dir / PUBLIC_KEY_NAME
    if priv.exists():
        key = load_private_key(priv)
    else:
        key = generate_key()
        save_private_key(key, priv)
    if not pub.exists():
        save_public_key(key, pub)
    return key, pub


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:120] if text else type(e).__name__


# ---- raw bytes ---------------------------------------------------------------------------------


def sign(key: Ed25519PrivateKey, data: bytes) -> bytes:
    return key.sign(data)


def verify(
    public_key: Ed25519PublicKey,
    data: bytes,
    signature: bytes,
    where: str = "message",
    signer: str = "the coordinator's public key",
) -> None:
    """Raise WireError unless `signature` is `public_key`'s signature of `data`; `signer` names the key
    in the error."""
    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        raise WireError(f"{where}: signature does not verify with {signer}") from None


# ---- wire messages -----------------------------------------------------------------------------


def signed_bytes(fields: Mapping, digest: str) -> bytes:
    """The exact bytes a message signature covers: envelope fields without the signature + digest."""
    fields = dict(fields)
    fields["body"] = {k: v for k, v in dict(fields.get("body") or {}).items() if k != SIGNATURE_FIELD}
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode() + b"|" + digest.encode()


def sign_envelope(
    key: Ed25519PrivateKey,
    envelope: Envelope,
    tensors: Mapping[str, np.ndarray] | None = None,
    digest: str | None = None,
) -> Envelope:
    """The envelope with `body.signature` set; pass the result and the same tensors to `wire.encode`.
    `digest`: the tensors' `tensors_digest`, when the caller has it already."""
    if not envelope.sent_at:
        envelope = replace(envelope, sent_at=time.time())
    if digest is None:
        digest = tensors_digest(tensors) if tensors else ""
    sig = key.sign(signed_bytes(envelope.fields(), digest))
    body = dict(envelope.body)
    body[SIGNATURE_FIELD] = base64.b64encode(sig).decode("ascii")
    return replace(envelope, body=body)


def verify_message(
    public_key: Ed25519PublicKey,
    msg: Message,
    where: str = "message",
    signer: str = "the coordinator's public key",
) -> None:
    """Raise WireError unless `msg` (already decoded by `wire.decode`) carries a valid signature."""
    raw = msg.envelope.body.get(SIGNATURE_FIELD)
    if not isinstance(raw, str) or not raw:
        raise WireError(f"{where}: unsigned message (no {SIGNATURE_FIELD!r} in the body)")
    try:
        sig = base64.b64decode(raw.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise WireError(f"{where}: signature is not valid base64") from None
    if len(sig) != 64:
        raise WireError(f"{where}: signature has {len(sig)} bytes, an Ed25519 signature has 64")
    # `wire.decode` checked the tensors against their digest already; recompute only for a Message
    # built another way
    digest = msg.digest or (tensors_digest(msg.tensors) if msg.tensors else "")
    verify(public_key, signed_bytes(msg.envelope.fields(), digest), sig, where, signer)
