"""The adapter file format: save/load round trip, metadata rules, corrupt input -> AdapterError."""

from __future__ import annotations

import json
import logging
import random
import struct
import uuid

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from fedclip.sdk.adapters import (
    AdapterMeta,
    adapter_bytes,
    adapter_from_bytes,
    check_adapter,
    check_tensors,
    decode_tensors,
    load_adapter,
    save_adapter,
)
from fedclip.sdk.errors import AdapterError
from fedclip.sdk.manifest import TensorSpec

SPECS = (
    TensorSpec("b.lora_A", (2, 8)),
    TensorSpec("a.lora_B", (8, 2)),
    TensorSpec("a.lora_C", (2, 2), exchanged=False),
)


def tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.standard_normal(s.shape).astype(np.float32) for s in SPECS}


META = AdapterMeta(
    bundle_id="b" * 64,
    version="v3",
    parent_version="v2",
    round=7,
    strategy="fedavg",
    kind="lora",
    agent="agent-01",
)


def test_save_load_round_trip(tmp_path):
    t = tensors()
    path = save_adapter(tmp_path / "sub" / "adapter.safetensors", t, META)
    loaded, meta = load_adapter(path)
    assert meta == META
    assert set(loaded) == set(t) and all(np.array_equal(loaded[k], t[k]) for k in t)
    assert all(loaded[k].dtype == np.float32 for k in t)
    assert not list(path.parent.glob(".*tmp")), "temporary file left behind"


def test_bytes_round_trip_and_stable_encoding():
    blob = adapter_bytes(tensors(), META)
    assert adapter_bytes(tensors(), META) == blob  # sorted names and metadata: same input, same bytes
    loaded, meta = adapter_from_bytes(blob)
    assert meta == META and np.array_equal(loaded["a.lora_B"], tensors()["a.lora_B"])


def test_metadata_is_sorted_strings_with_format_version():
    blob = adapter_bytes(tensors(), META)
    header_len = struct.unpack("<Q", blob[:8])[0]
    meta = json.loads(blob[8 : 8 + header_len])["__metadata__"]
    assert list(meta) == sorted(meta) and all(isinstance(v, str) for v in meta.values())
    assert meta["fedclip_adapter_format"] == "1" and meta["round"] == "7"


def raw_blob(meta: dict[str, str]) -> bytes:
    return st_save({"x": np.zeros(2, np.float32)}, metadata=meta)


def test_unknown_metadata_field_warns_once(caplog):
    field = f"future_{uuid.uuid4().hex[:8]}"
    blob = raw_blob({"fedclip_adapter_format": "1", "bundle_id": "b", "version": "v", field: "x"})
    with caplog.at_level(logging.WARNING, logger="fedclip.sdk.adapters"):
        adapter_from_bytes(blob)
        adapter_from_bytes(blob)
    warnings = [r for r in caplog.records if field in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"bundle_id": "b", "version": "v"}, "not a fedclip adapter"),
        (
            {"fedclip_adapter_format": "2", "bundle_id": "b", "version": "v"},
            "adapter format '2' is not supported",
        ),
        ({"fedclip_adapter_format": "1", "version": "v"}, "metadata field 'bundle_id' is missing"),
        ({"fedclip_adapter_format": "1", "bundle_id": "b"}, "metadata field 'version' is missing"),
        (
            {"fedclip_adapter_format": "1", "bundle_id": "b", "version": "v", "round": "x"},
            "'round' is not an integer",
        ),
    ],
)
def test_missing_or_bad_metadata_is_an_error(meta, message):
    with pytest.raises(AdapterError, match=message):
        adapter_from_bytes(raw_blob(meta), "upd")


def header_blob(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    "blob",
    [
        b"",
        b"short",
        b"\xff" * 64,
        struct.pack("<Q", 10**9) + b"{}",
        struct.pack("<Q", 4) + b"nope",
        header_blob([1, 2]),
        header_blob({"__metadata__": {"a": 1}}),
        header_blob({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8),
        header_blob({"t": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, b"\0\0"),
        header_blob({"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 4]}}, b"\0" * 4),
    ],
    ids=[
        "empty",
        "short",
        "garbage",
        "huge-header",
        "not-json",
        "list-header",
        "non-str-meta",
        "truncated",
        "bf16",
        "overflow",
    ],
)
def test_corrupt_bytes_are_adapter_errors(blob):
    with pytest.raises(AdapterError):
        adapter_from_bytes(blob, "x")


def test_random_corruption_never_escapes_as_another_exception():
    blob = adapter_bytes(tensors(), META)
    rnd = random.Random(0)
    for _ in range(500):
        b = bytearray(blob)
        for _ in range(rnd.randint(1, 4)):
            b[rnd.randrange(len(b))] = rnd.randrange(256)
        if rnd.random() < 0.3:
            b = b[: rnd.randrange(len(b))]
        try:
            adapter_from_bytes(bytes(b))
        except AdapterError:
            pass


def test_load_missing_file(tmp_path):
    with pytest.raises(AdapterError, match="cannot read adapter"):
        load_adapter(tmp_path / "nope.safetensors")


def test_decode_tensors_returns_metadata():
    t, meta = decode_tensors(raw_blob({"k": "v"}), "x")
    assert meta == {"k": "v"} and t["x"].shape == (2,)


# ---- validation against the manifest --------------------------------------------------------------
def test_check_tensors_accepts_matching_and_copies():
    t = tensors()
    out = check_tensors(t, SPECS, "upd")
    assert out.keys() == t.keys() and out["a.lora_B"] is not t["a.lora_B"]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda t: t.update(extra=np.zeros(1, np.float32)), "unknown tensor 'extra'"),
        (lambda t: t.pop("a.lora_B"), "tensor 'a.lora_B' is missing"),
        (lambda t: t.update({"a.lora_B": np.zeros((8, 2), np.float64)}), "dtype float64, expected float32"),
        (
            lambda t: t.update({"a.lora_B": np.zeros((2, 8), np.float32)}),
            r"shape \[2, 8\], expected \[8, 2\]",
        ),
        (lambda t: t["a.lora_B"].__setitem__((0, 0), np.nan), "non-finite"),
        (lambda t: t["a.lora_B"].__setitem__((0, 0), np.inf), "non-finite"),
    ],
)
def test_check_tensors_rejects(change, message):
    t = tensors()
    change(t)
    with pytest.raises(AdapterError, match=message):
        check_tensors(t, SPECS, "upd")


def test_check_tensors_partial_and_check_adapter_exchanged_only():
    t = tensors()
    del t["a.lora_C"]
    check_tensors(t, SPECS, "upd", require_all=False)

    class FakeManifest:  # check_adapter only reads these two views of a Manifest
        exchanged = tuple(s for s in SPECS if s.exchanged)
        trainable = SPECS

    assert set(check_adapter(t, FakeManifest, "upd")) == {"a.lora_B", "b.lora_A"}
    with pytest.raises(AdapterError, match="missing"):
        check_adapter(t, FakeManifest, "upd", exchanged_only=False)


@pytest.mark.parametrize("dtype", ["<f4", ">f4", "f2", "f8", "i8", "i4", "u1", "i1", "bool"])
def test_encode_tensors_dtypes_round_trip_through_safetensors(dtype):
    from safetensors.numpy import load as st_load

    from fedclip.sdk.adapters import encode_tensors

    arr = (np.arange(12).reshape(3, 4) % 2 if dtype == "bool" else np.arange(12).reshape(3, 4)).astype(dtype)
    blob = encode_tensors({"x": arr, "empty": np.zeros((0, 2), np.float32)}, {"k": "v"})
    loaded = st_load(blob)  # the reference reader accepts what we write
    assert np.array_equal(loaded["x"], arr) and loaded["x"].dtype == arr.dtype.newbyteorder("=")
    assert loaded["empty"].shape == (0, 2)
    assert decode_tensors(blob, "x")[1] == {"k": "v"}


def test_encode_tensors_refuses_unstorable_dtype():
    from fedclip.sdk.adapters import encode_tensors

    with pytest.raises(AdapterError, match="cannot be stored"):
        encode_tensors({"x": np.array(["text"])}, {})
