"""Ed25519 signing: keys on disk, raw signatures, signed wire messages (tampering is refused)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from fedclip.sdk.errors import ConfigError, WireError
from fedclip.sdk.signing import (
    ensure_keypair,
    generate_key,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
    sign,
    sign_envelope,
    verify,
    verify_message,
)
from fedclip.sdk.wire import Envelope, MsgType, decode, encode


def test_key_files_round_trip_and_private_key_is_0600(tmp_path):
    key = generate_key()
    priv = save_private_key(key, tmp_path / "k.pem")
    pub = save_public_key(key, tmp_path / "k.pub.pem")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    sig = sign(load_private_key(priv), b"hello")
    verify(load_public_key(pub), b"hello", sig)
    with pytest.raises(WireError, match="does not verify"):
        verify(load_public_key(pub), b"hellO", sig)


def test_ensure_keypair_makes_the_key_once(tmp_path):
    k1, pub1 = ensure_keypair(tmp_path / "keys")
    k2, pub2 = ensure_keypair(tmp_path / "keys")
    assert pub1 == pub2
    assert k1.private_bytes_raw() == k2.private_bytes_raw()


def test_bad_key_files_are_one_line_config_errors(tmp_path):
    (tmp_path / "junk.pem").write_text("not a key")
    for loader in (load_private_key, load_public_key):
        with pytest.raises(ConfigError) as e:
            loader(tmp_path / "junk.pem")
        assert "\n" not in str(e.value)
        with pytest.raises(ConfigError, match="cannot read"):
            loader(tmp_path / "missing.pem")
    # a public key where a private one is expected
    save_public_key(generate_key(), tmp_path / "pub.pem")
    with pytest.raises(ConfigError):
        load_private_key(tmp_path / "pub.pem")


def _signed_adapter(key):
    tensors = {
        "a.lora_A": np.arange(12, dtype=np.float32).reshape(3, 4),
        "a.lora_B": np.ones((4, 3), np.float32),
    }
    env = Envelope(MsgType.ADAPTER, "fleet1", "agent1", body={"version": "v1", "rollout": 3})
    return encode(sign_envelope(key, env, tensors), tensors), tensors


def test_signed_message_verifies_and_any_change_is_refused():
    key = generate_key()
    payload, tensors = _signed_adapter(key)
    verify_message(key.public_key(), decode(payload, fleet="fleet1"))

    # another key
    with pytest.raises(WireError, match="does not verify"):
        verify_message(generate_key().public_key(), decode(payload, fleet="fleet1"))
    # unsigned
    plain = encode(Envelope(MsgType.ADAPTER, "fleet1", "agent1", body={"version": "v1"}), tensors)
    with pytest.raises(WireError, match="unsigned"):
        verify_message(key.public_key(), decode(plain, fleet="fleet1"))
    # the same signature on other tensors (re-encoded so the wire digest is consistent)
    msg = decode(payload, fleet="fleet1")
    evil = {k: v * 2 for k, v in msg.tensors.items()}
    forged = encode(msg.envelope, evil)
    with pytest.raises(WireError, match="does not verify"):
        verify_message(key.public_key(), decode(forged, fleet="fleet1"))
    # the same signature with another body field (e.g. redirected to another agent)
    env = msg.envelope
    forged = encode(
        Envelope(env.type, env.fleet, "agent2", env.round, env.base_version, env.body, env.sent_at),
        msg.tensors,
    )
    with pytest.raises(WireError, match="does not verify"):
        verify_message(key.public_key(), decode(forged, fleet="fleet1"))


def test_every_single_byte_flip_is_refused():
    """Flip each byte of a signed payload in turn: decode or verification refuses it, or what it
    decodes to is exactly the signed content (a flip in JSON syntax the parser ignores, such as an
    unknown key that replaced a default-valued one)."""
    key = generate_key()
    payload, _ = _signed_adapter(key)
    original = decode(payload, fleet="fleet1")
    refused = 0
    for i in range(len(payload)):
        bad = bytearray(payload)
        bad[i] ^= 0x01
        try:
            msg = decode(bytes(bad), fleet="fleet1")
            verify_message(key.public_key(), msg)
        except WireError:
            refused += 1
            continue
        assert msg.envelope == original.envelope, f"offset {i}: a changed envelope was accepted"
        assert msg.tensors.keys() == original.tensors.keys()
        for name, arr in msg.tensors.items():
            assert np.array_equal(arr, original.tensors[name]), f"offset {i}: changed tensor {name} accepted"
    assert refused > 0.9 * len(payload)


def test_signed_command_without_tensors():
    key = generate_key()
    env = sign_envelope(key, Envelope(MsgType.COMMAND, "f", "a", body={"command": "rollback", "rollout": 1}))
    msg = decode(encode(env), fleet="f")
    verify_message(key.public_key(), msg)
    tampered = encode(
        Envelope(MsgType.COMMAND, "f", "a", body={**env.body, "rollout": 2}, sent_at=env.sent_at)
    )
    with pytest.raises(WireError):
        verify_message(key.public_key(), decode(tampered, fleet="f"))
