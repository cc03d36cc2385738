"""Wire protocol: encode/decode round trips and every rejection path (each a WireError, never a crash)."""

from __future__ import annotations

import json
import random
import struct
import zlib

import numpy as np
import pytest

from fedclip.sdk.adapters import encode_tensors
from fedclip.sdk.errors import WireError
from fedclip.sdk.wire import (
    COMPRESSED_MAGIC,
    STAT_LABEL_HIST,
    Envelope,
    Message,
    MsgType,
    Topics,
    decode,
    encode,
    tensors_digest,
)

FLEET = "fleet-1"
KEY = b"shared-secret"


def update_env(**changes) -> Envelope:
    fields = dict(
        type=MsgType.UPDATE,
        fleet=FLEET,
        agent="agent-01",
        round=4,
        base_version="v3",
        body={"bundle_id": "b" * 64, "num_samples": 120, "metrics": {"loss": 0.5}},
    )
    fields.update(changes)
    return Envelope(**fields)


def update_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "visual.q_proj.lora_A": rng.standard_normal((4, 16)).astype(np.float32),
        "visual.q_proj.lora_B": rng.standard_normal((16, 4)).astype(np.float32),
        STAT_LABEL_HIST: np.array([3, 0, 5], np.float32),
    }


# ---- round trips -----------------------------------------------------------------------------------
def test_update_round_trip_with_tensors_and_hmac():
    env = update_env()
    blob = encode(env, update_tensors(), hmac_key=KEY)
    msg = decode(blob, fleet=FLEET, expect=MsgType.UPDATE, hmac_key=KEY)
    assert isinstance(msg, Message)
    got = msg.envelope
    assert (got.type, got.fleet, got.agent, got.round, got.base_version, got.body) == (
        env.type,
        env.fleet,
        env.agent,
        env.round,
        env.base_version,
        env.body,
    )
    assert got.sent_at > 0
    assert set(msg.adapter_tensors) == {"visual.q_proj.lora_A", "visual.q_proj.lora_B"}
    assert set(msg.stats) == {STAT_LABEL_HIST}
    for name, arr in update_tensors().items():
        assert np.array_equal(msg.tensors[name], arr)


def test_status_round_trip_is_json():
    env = Envelope(
        MsgType.STATUS, FLEET, "agent-01", body={"state": "online", "versions": {"fedclip": "0.1"}}
    )
    blob = encode(env)
    assert json.loads(blob)["type"] == "status"
    msg = decode(blob, fleet=FLEET, expect=(MsgType.STATUS, MsgType.ACK))
    assert msg.envelope.body["state"] == "online" and msg.tensors == {}
    assert decode(encode(env, hmac_key=KEY), fleet=FLEET, hmac_key=KEY).envelope.agent == "agent-01"


@pytest.mark.parametrize("mtype", list(MsgType))
def test_every_type_round_trips(mtype):
    env = Envelope(mtype, FLEET, "a", round=0)
    assert decode(encode(env), fleet=FLEET, expect=mtype).envelope.type is mtype
    blob = encode(env, {"t": np.ones(2, np.float32)})
    assert decode(blob, fleet=FLEET, expect=mtype).tensors["t"].tolist() == [1.0, 1.0]


def test_digest_ignores_container_order():
    t = update_tensors()
    assert tensors_digest(t) == tensors_digest(dict(reversed(list(t.items()))))
    t2 = dict(t)
    t2["visual.q_proj.lora_A"] = t2["visual.q_proj.lora_A"].copy()
    t2["visual.q_proj.lora_A"][0, 0] += 1
    assert tensors_digest(t2) != tensors_digest(t)


# ---- rejections ------------------------------------------------------------------------------------
def json_payload(**changes) -> bytes:
    header = json.loads(encode(Envelope(MsgType.STATUS, FLEET, "agent-01", body={"state": "online"})))
    header.update(changes)
    return json.dumps(header).encode()


def tensor_payload(header: dict | str, tensors: dict[str, np.ndarray] | None = None) -> bytes:
    meta = header if isinstance(header, str) else json.dumps(header)
    return encode_tensors(tensors or {"t": np.ones(2, np.float32)}, {"fedclip": meta})


def signed_header(env: Envelope, tensors: dict[str, np.ndarray]) -> dict:
    blob = encode(env, tensors, compress=False)
    head_len = struct.unpack("<Q", blob[:8])[0]
    return json.loads(json.loads(blob[8 : 8 + head_len])["__metadata__"]["fedclip"])


REJECTIONS = {
    "empty": (b"", "empty payload"),
    "garbage": (bytes(range(256)) * 4, "safetensors"),
    "short-garbage": (b"\x00\x01", "too short"),
    "bad-json": (b"{not json", "not valid JSON"),
    "deep-json": (b'{"a":' + b"[" * 200_000, "not valid JSON"),
    "json-array": (b"[1, 2]", "safetensors"),
    "json-not-object": (tensor_payload("[1, 2]"), "must be a JSON object"),
    "json-string": (b'{"a": "\xff\xfe"}', "not valid JSON"),
    "schema-missing": (json_payload(schema=None), "schema version"),
    "schema-future": (json_payload(schema=2), "schema version 2"),
    "schema-bool": (json_payload(schema=True), "schema version"),
    "unknown-type": (json_payload(type="exploit"), "unknown message type 'exploit'"),
    "wrong-fleet": (json_payload(fleet="other"), "for fleet 'other'"),
    "bad-fleet-id": (json_payload(fleet="a/b"), "'fleet' is not a valid id"),
    "bad-agent-id": (json_payload(agent="a+#"), "'agent' is not a valid id"),
    "empty-agent-id": (json_payload(agent=""), "'agent' is not a valid id"),
    "long-agent-id": (json_payload(agent="a" * 65), "'agent' is not a valid id"),
    "agent-not-str": (json_payload(agent=5), "'agent' is not a valid id"),
    "round-str": (json_payload(round="3"), "'round' must be an integer"),
    "round-bool": (json_payload(round=True), "'round' must be an integer"),
    "round-negative": (json_payload(round=-2), "'round' must be an integer in [-1, "),
    "round-huge": (json_payload(round=2**63), "'round' must be an integer in [-1, "),
    "sent-at-huge": (json_payload(sent_at=float(2**1000)), "'sent_at' is not a plausible"),
    "base-version-long": (json_payload(base_version="v" * 129), "base_version"),
    "body-list": (json_payload(body=[1]), "'body' must be an object"),
    "sent-at-nan": (
        b'{"schema": 1, "type": "status", "fleet": "fleet-1", "agent": "a", "sent_at": NaN}',
        "sent_at",
    ),
    "sent-at-str": (json_payload(sent_at="now"), "sent_at"),
    "json-claims-tensors": (
        json_payload(tensors_sha256="ab" * 32),
        "names tensors but the payload carries none",
    ),
    "no-envelope": (encode_tensors({"t": np.ones(2, np.float32)}, {"other": "x"}), "no fedclip envelope"),
    "envelope-not-json": (tensor_payload("{oops"), "envelope metadata is not valid JSON"),
    "envelope-deep": (tensor_payload("[" * 200_000), "envelope metadata is not valid JSON"),
}


@pytest.mark.parametrize("payload, message", REJECTIONS.values(), ids=REJECTIONS.keys())
def test_rejected(payload, message):
    with pytest.raises(WireError) as exc:
        decode(payload, fleet=FLEET)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)


def test_nan_tensor_is_rejected():
    t = update_tensors()
    t["visual.q_proj.lora_A"][1, 2] = np.nan
    with pytest.raises(WireError, match="'visual.q_proj.lora_A' has non-finite values"):
        decode(encode(update_env(), t), fleet=FLEET)
    t["visual.q_proj.lora_A"][1, 2] = -np.inf
    with pytest.raises(WireError, match="non-finite"):
        decode(encode(update_env(), t), fleet=FLEET)


def test_unsupported_tensor_dtype_is_rejected():
    with pytest.raises(WireError, match="unsupported dtype bool"):
        decode(encode(update_env(), {"t": np.array([True, False])}), fleet=FLEET)


def test_digest_mismatch_is_rejected():
    t = update_tensors()
    header = signed_header(update_env(), t)
    t["visual.q_proj.lora_B"] = t["visual.q_proj.lora_B"] * 2  # swapped in after the envelope was made
    with pytest.raises(WireError, match="tensors do not match their sha256"):
        decode(tensor_payload(header, t), fleet=FLEET)


def test_oversized_payload_is_rejected_before_parsing():
    blob = encode(update_env(), update_tensors(), compress=False)
    with pytest.raises(WireError, match=f"payload of {len(blob)} bytes exceeds the limit of 100"):
        decode(blob, fleet=FLEET, max_bytes=100)
    assert decode(blob, fleet=FLEET, max_bytes=len(blob)).envelope.round == 4


def test_unexpected_type_is_rejected():
    with pytest.raises(WireError, match="unexpected message type 'update'"):
        decode(encode(update_env(), update_tensors()), fleet=FLEET, expect=(MsgType.TASK, MsgType.STATUS))


def test_hmac_wrong_key_missing_or_tampered():
    t = update_tensors()
    blob = encode(update_env(), t, hmac_key=KEY)
    with pytest.raises(WireError, match="HMAC missing or wrong"):
        decode(blob, fleet=FLEET, hmac_key=b"other-key")
    with pytest.raises(WireError, match="HMAC missing or wrong"):
        decode(encode(update_env(), t), fleet=FLEET, hmac_key=KEY)  # unsigned
    header = signed_header(update_env(), t) | {"hmac": "0" * 64}
    with pytest.raises(WireError, match="HMAC"):
        decode(tensor_payload(header, t), fleet=FLEET, hmac_key=KEY)
    # a signed envelope whose round was changed in transit
    header = json.loads(encode(Envelope(MsgType.STATUS, FLEET, "a", round=1), hmac_key=KEY))
    header["round"] = 2
    with pytest.raises(WireError, match="HMAC"):
        decode(json.dumps(header).encode(), fleet=FLEET, hmac_key=KEY)
    # a receiver without a key accepts signed messages (the key is opt-in per fleet)
    assert decode(blob, fleet=FLEET).envelope.agent == "agent-01"


def test_random_corruption_only_ever_raises_wire_error():
    blob = encode(update_env(), update_tensors(), hmac_key=KEY)
    rnd = random.Random(1)
    for _ in range(1000):
        b = bytearray(blob)
        for _ in range(rnd.randint(1, 5)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        if rnd.random() < 0.2:
            b = b[: rnd.randrange(len(b))]
        try:
            decode(bytes(b), fleet=FLEET, hmac_key=KEY)
        except WireError:
            pass


# ---- helpers -----------------------------------------------------------------------------------------
def test_topics():
    t = Topics(FLEET)
    assert t.coordinator_status == "fedclip/fleet-1/coordinator/status"
    assert t.task("a1") == "fedclip/fleet-1/agents/a1/task"
    assert t.all_agents("update") == "fedclip/fleet-1/agents/+/update"
    assert t.rollout("v3", "ack") == "fedclip/fleet-1/rollout/v3/ack"
    assert t.parse_agent(t.update("agent-7")) == ("agent-7", "update")
    for bad in (
        "fedclip/other/agents/a/update",
        "fedclip/fleet-1/agents/a/b/c",
        "fedclip/fleet-1/agents/a+b/x",
    ):
        with pytest.raises(WireError):
            t.parse_agent(bad)
    with pytest.raises(WireError):
        Topics("bad/fleet")


def test_encode_refuses_non_finite_body_with_a_wire_error():
    with pytest.raises(WireError, match="not JSON-serializable or not finite"):
        encode(update_env(body={"metrics": {"loss": float("nan")}}))
    with pytest.raises(WireError):
        encode(update_env(body={"when": object()}), update_tensors())


# ---- compression -----------------------------------------------------------------------------
def _many_small_tensors() -> dict[str, np.ndarray]:
    # A CE-LoRA update's shape: dozens of r x r cores with long names, the header outweighs the data.
    rng = np.random.default_rng(0)
    names = [f"transformer.resblocks.{i}.attn.{p}_proj.lora_C" for i in range(12) for p in "qv"]
    return {n: rng.standard_normal((4, 4)).astype(np.float32) for n in names}


def test_small_tensor_messages_travel_compressed_and_decode_the_same():
    t = _many_small_tensors()
    plain = encode(update_env(), t, compress=False)
    packed = encode(update_env(), t)
    assert packed[:4] == COMPRESSED_MAGIC and plain[:4] != COMPRESSED_MAGIC
    assert len(packed) < 0.7 * len(plain)
    for blob in (packed, plain):  # a plain message from an older sender still decodes
        msg = decode(blob, fleet=FLEET)
        assert msg.envelope.round == 4 and sorted(msg.tensors) == sorted(t)
        for n in t:
            np.testing.assert_array_equal(msg.tensors[n], t[n])


def test_json_messages_and_incompressible_tensors_stay_plain():
    assert encode(update_env())[:1] == b"{"
    noise = {"w": np.random.default_rng(1).standard_normal((512, 512)).astype(np.float32)}
    blob = encode(update_env(), noise)
    assert blob[:4] != COMPRESSED_MAGIC  # zlib saves a few % on random floats: sent as they are
    assert decode(blob, fleet=FLEET).tensors["w"].shape == (512, 512)


def test_a_zip_bomb_is_refused_without_inflating_it():
    bomb = COMPRESSED_MAGIC + zlib.compress(b"\0" * (50 << 20), 9)  # 50 MB of zeros in ~50 KB
    assert len(bomb) < 100_000
    with pytest.raises(WireError, match="decompressed payload exceeds the limit of 1048576 bytes"):
        decode(bomb, fleet=FLEET, max_bytes=1 << 20)


@pytest.mark.parametrize(
    "mangle, message",
    [
        (lambda b: b[:-10], "truncated"),
        (lambda b: b + b"extra", "trailing bytes"),
        (lambda b: b[:4] + b"\xff" * 8 + b[12:], "corrupt"),
        (lambda b: COMPRESSED_MAGIC + zlib.compress(b'{"schema": 1}'), "holds no tensors"),
    ],
    ids=["truncated", "trailing", "corrupt", "json-inside"],
)
def test_broken_compressed_payloads_are_one_line_errors(mangle, message):
    blob = encode(update_env(), _many_small_tensors())
    with pytest.raises(WireError, match=message) as err:
        decode(mangle(blob), fleet=FLEET)
    assert "\n" not in str(err.value)
