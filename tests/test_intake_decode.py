"""Updates decoded and their signatures checked ahead of the round loop (`coordinator.intake_decode`):
each answer is what `wire.decode` and `verify_message` say in the loop, in a real worker process too,
and a pool that breaks gives way to decoding in the loop. The round loop's use of it, refusals
included, is in test_group_commit.py; a kill -9 of the coordinator while it runs, in
test_intake_crash.py."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from fedclip.coordinator.intake_decode import Batch, Decoded, DecodePool, Job, decode_job, update_blob
from fedclip.coordinator.store.blobs import Blobs
from fedclip.coordinator.trust import Trust
from fedclip.sdk.errors import WireError
from fedclip.sdk.hashing import sha256_bytes
from fedclip.sdk.manifest import TensorSpec
from fedclip.sdk.signing import generate_key, sign_envelope, verify_message
from fedclip.sdk.wire import Envelope, MsgType, decode, encode

FLEET = "d1"
KEY, OTHER = generate_key(), generate_key()
RAW = KEY.public_key().public_bytes_raw()
LIMIT = 1 << 20
BATCH = Batch(FLEET, LIMIT)  # decoding only, nothing stored ahead
SPECS = (TensorSpec("x.lora_A", (4, 8)),)


def _update(agent="a1", key=KEY, seed=0, fleet=FLEET, rnd=1, shape=(4, 8), stats=np.float32) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {
        "x.lora_A": rng.standard_normal(shape).astype(np.float32),
        "stats/label_hist": np.array([1, 2, 3], stats),
    }
    env = Envelope(MsgType.UPDATE, fleet, agent, round=rnd, body={"bundle_id": "b", "num_samples": 3})
    return encode(sign_envelope(key, env, tensors) if key is not None else env, tensors)


def _in_the_loop(job: Job) -> tuple[str, str]:
    """(decode error, verify error) as the round loop gets them."""
    try:
        msg = decode(job.payload, fleet=FLEET, expect=MsgType.UPDATE, max_bytes=LIMIT, where=job.where)
    except WireError as e:
        return str(e), ""
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        verify_message(Ed25519PublicKey.from_public_bytes(job.key), msg, job.where, signer=job.signer)
    except WireError as e:
        return "", str(e)
    return "", ""


JOBS = [
    Job(_update(), "u0", RAW, "agent a1's enrolled key"),
    Job(_update(key=OTHER), "u1", RAW, "agent a1's enrolled key"),  # signed by another key
    Job(_update(key=None), "u2", RAW, "agent a1's enrolled key"),  # unsigned
    Job(_update()[:-9], "u3", RAW, "k"),  # cut short
    Job(_update(fleet="other"), "u4", RAW, "k"),  # another fleet's
    Job(b"\x00" * 9, "u5", RAW, "k"),  # not safetensors
    Job(_update(seed=5), "u6", RAW, "agent a1's enrolled key"),
]


def _same(got: Decoded, job: Job) -> None:
    error, verify_error = _in_the_loop(job)
    assert got.error == error
    if error:
        assert got.msg is None
        return
    assert got.msg is not None and got.key == RAW and got.verify_error == verify_error
    want = decode(job.payload, fleet=FLEET, expect=MsgType.UPDATE, max_bytes=LIMIT, where=job.where)
    assert got.msg.envelope == want.envelope and got.msg.digest == want.digest
    for name, value in want.tensors.items():
        np.testing.assert_array_equal(got.msg.tensors[name], value)


def test_each_job_gets_what_decoding_and_verifying_in_the_loop_give():
    for job in JOBS:
        _same(decode_job(job, BATCH), job)
    assert decode_job(JOBS[0], BATCH).verify_error == ""
    assert "does not verify" in decode_job(JOBS[1], BATCH).verify_error
    unchecked = decode_job(Job(_update(key=OTHER), "u", b""), BATCH)  # no key: not checked
    assert unchecked.msg is not None and unchecked.key == b"" and unchecked.verify_error == ""


def test_a_worker_process_gives_each_batch_what_the_loop_would():
    pool = DecodePool(1, min_batch=4)
    try:
        assert pool.submit(JOBS[:3], BATCH) is None  # a small batch is decoded in the loop
        results = pool.result(pool.submit(JOBS, BATCH))
        assert results is not None and len(results) == len(JOBS)
        for got, job in zip(results, JOBS, strict=True):
            _same(got, job)
    finally:
        pool.close()
    assert DecodePool(0, min_batch=1).submit(JOBS, BATCH) is None  # no workers: in the loop


def test_a_broken_pool_gives_way_to_the_loop_and_the_next_batch_starts_a_new_one():
    pool = DecodePool(1, min_batch=1)
    try:
        assert pool.result(pool.submit(JOBS, BATCH)) is not None
        assert pool._pool is not None
        for pid in list(pool._pool._processes):  # the worker dies (OOM killer, kill -9)
            os.kill(pid, signal.SIGKILL)
        broken = pool.submit(JOBS, BATCH)  # refused at once, or failing when awaited
        assert pool.result(broken) is None
        assert pool._pool is None  # dropped: this batch decodes in the loop
        results = pool.result(pool.submit(JOBS, BATCH))  # a new pool for the next one
        assert results is not None
        _same(results[0], JOBS[0])
    finally:
        pool.close()


def test_a_worker_stores_ahead_only_signed_updates_of_the_bundle_for_the_open_round(tmp_path):
    """Stored ahead: the update as the loop would store it (float32 statistics), durable in the blob
    folder; anything the loop will surely refuse is not written at all."""
    signer = "agent a1's enrolled key"
    jobs = {
        "signed": Job(_update(), "u", RAW, signer),
        "f64 stats": Job(_update(seed=2, stats=np.float64), "u", RAW, signer),
        "another key": Job(_update(key=OTHER), "u", RAW, signer),
        "no key": Job(_update(key=None), "u", b"", signer),
        "round 2": Job(_update(rnd=2), "u", RAW, signer),
        "wrong shape": Job(_update(shape=(8, 4)), "u", RAW, signer),
        "int stats": Job(_update(seed=3, stats=np.int32), "u", RAW, signer),
        "cut short": Job(_update()[:-9], "u", RAW, signer),
    }
    blobs = tmp_path / "blobs"
    batch = Batch(FLEET, LIMIT, str(blobs), round=1, specs=SPECS, provisioned=True)
    pool = DecodePool(1, min_batch=1)
    try:
        results = dict(zip(jobs, pool.result(pool.submit(list(jobs.values()), batch)) or [], strict=True))
        open_fleet = Batch(FLEET, LIMIT, str(blobs), round=1, specs=SPECS, provisioned=False)
        unprovisioned = pool.result(pool.submit([jobs["no key"]], open_fleet))
    finally:
        pool.close()
    assert [k for k, d in results.items() if d.blob] == ["signed", "f64 stats"]
    for k in ("signed", "f64 stats"):
        msg = results[k].msg
        assert msg is not None
        stats = {n: v.astype(np.float32) for n, v in msg.stats.items()}
        want = update_blob(msg.adapter_tensors, stats, "a1", 1)
        assert results[k].blob == sha256_bytes(want) and Blobs(blobs).get(results[k].blob) == want
    # any sender of an open fleet; unsigned, it is stored as the signed copy (signatures are not)
    assert unprovisioned is not None and unprovisioned[0].blob == results["signed"].blob
    assert len(list(blobs.rglob("*"))) == 2 + 2  # two blobs in their folders, no temp files


class _Enrolled:
    def __init__(self, key):
        self.key = key

    def verify_key(self, agent_id):
        return self.key.public_key() if agent_id == "a1" else None

    def is_revoked(self, agent_id):
        return False


def test_trust_takes_a_check_made_ahead_only_with_the_agents_current_key():
    msg = decode(_update(key=OTHER), fleet=FLEET)  # a signature a1's key does not verify
    trust = Trust(_Enrolled(KEY))
    assert trust.sender_key("a1") == RAW and trust.sender_key("zz") == b""
    assert Trust(None).sender_key("a1") == b""
    with pytest.raises(WireError, match="does not verify"):
        trust.check("a1", msg, "u")
    with pytest.raises(WireError, match="^checked ahead: bad$"):
        trust.check("a1", msg, "u", (RAW, "checked ahead: bad"))
    trust.check("a1", msg, "u", (RAW, ""))  # verified ahead with a1's key: taken as it is
    # checked ahead with a key a1 no longer has (re-enrolled meanwhile): checked again here
    with pytest.raises(WireError, match="does not verify"):
        trust.check("a1", msg, "u", (OTHER.public_key().public_bytes_raw(), ""))
    with pytest.raises(WireError, match="is not enrolled"):
        trust.check("zz", decode(_update("zz"), fleet=FLEET), "u", (RAW, ""))


def test_a_payload_that_cannot_be_stored_ahead_leaves_the_rest_of_its_batch_stored(tmp_path, monkeypatch):
    """The worker's task run in this process: one update whose stored form fails (here: made to) is
    left to the loop, decoded all the same; the others of its batch are stored ahead."""
    from fedclip.coordinator import intake_decode

    real = intake_decode.update_blob

    def failing(tensors, stats, agent, round_id):
        if agent == "a2":
            raise ValueError("surprise")
        return real(tensors, stats, agent, round_id)

    monkeypatch.setattr(intake_decode, "update_blob", failing)
    keys = {"a1": KEY, "a2": OTHER}
    jobs = [Job(_update(a, keys[a]), "u", keys[a].public_key().public_bytes_raw(), "k") for a in ("a1", "a2")]
    batch = Batch(FLEET, LIMIT, str(tmp_path / "blobs"), round=1, specs=SPECS, provisioned=True)
    a1, a2 = intake_decode._decode_all(jobs, batch)
    assert a1.blob and Blobs(tmp_path / "blobs").has(a1.blob)
    assert a2.msg is not None and a2.verify_error == "" and a2.blob == ""


def test_a_decoded_message_crosses_back_from_a_worker_whole():
    """Pickled as one buffer of tensor bytes (`Decoded.__reduce__`): every dtype, shape (empty and
    0-d included) and value comes back, in writable arrays, with the envelope, digest and checks."""
    import pickle

    from fedclip.sdk.wire import Message

    tensors = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "stats/mean": np.linspace(-1, 1, 10, dtype=np.float16).reshape(2, 5),
        "b": np.array([[1, -2]], dtype=np.int64),
        "c": np.zeros((0, 4), np.float32),
        "d": np.array(7.5, dtype=np.float64),
        "e": np.arange(6, dtype=np.uint8)[::2],  # not contiguous
    }
    env = Envelope(MsgType.UPDATE, FLEET, "a1", round=3, body={"k": [1, "x"]})
    sent = Decoded(Message(env, tensors, "digest"), key=RAW, verify_error="why", blob="sha")
    back = pickle.loads(pickle.dumps(sent))
    assert (back.key, back.verify_error, back.blob, back.error) == (RAW, "why", "sha", "")
    assert back.msg is not None and back.msg.envelope == env and back.msg.digest == "digest"
    assert list(back.msg.tensors) == list(tensors)
    for name, arr in tensors.items():
        got = back.msg.tensors[name]
        assert got.dtype == arr.dtype and got.shape == arr.shape and got.flags.writeable
        np.testing.assert_array_equal(got, arr)
    failed = pickle.loads(pickle.dumps(Decoded(None, "bad payload")))
    assert failed == Decoded(None, "bad payload")


@pytest.mark.parametrize(
    "value,error",
    [
        ("-1", r"intake_workers: must be in \[0, 64\], got -1$"),
        ("65", r"intake_workers: must be in \[0, 64\], got 65$"),
        ("1" + "0" * 30, r"intake_workers: must be in \[0, 64\], got 10{30}$"),
        ("two", r"intake_workers: expected an integer, got 'two'$"),
        ("true", r"intake_workers: expected an integer, got True$"),
        ("1.5", r"intake_workers: expected an integer, got 1.5$"),
        (".nan", r"intake_workers: expected an integer, got nan$"),
    ],
)
def test_a_bad_intake_workers_setting_is_one_line_refused(tmp_path, value, error):
    from fedclip.coordinator.config import CoordConfig
    from fedclip.sdk.errors import ConfigError

    path, base = tmp_path / "coord.yaml", "broker: mqtt://127.0.0.1:1883\nfleet: f1\nbundle: b\nstate: s\n"
    path.write_text(f"{base}intake_workers: {value}\n")
    with pytest.raises(ConfigError, match=error) as exc:
        CoordConfig.load(path, {})
    assert "\n" not in str(exc.value)
    path.write_text(f"{base}intake_workers: null\n")
    assert CoordConfig.load(path, {}).intake_workers is None  # unset: the default per CPU count
