"""The adapter file format: named float tensors in safetensors, with sorted string metadata.

Names are the torch parameter names of the LoRA modules, which the ONNX initializers carry too, so
one file loads into PyTorch and into every ONNX graph of the bundle.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from fedclip.sdk import label_prior
from fedclip.sdk.errors import AdapterError
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.manifest import Manifest, TensorSpec

log = logging.getLogger(__name__)

ADAPTER_FORMAT = "1"
_FORMAT_KEY = "fedclip_adapter_format"
_REQUIRED = ("bundle_id", "version")
_KNOWN = ("bundle_id", "version", "parent_version", "round", "strategy", "kind", "agent")
# Written only when set, so adapters without it keep their bytes (and content addresses).
_OPTIONAL = ("label_prior",)
_warned_fields: set[str] = set()


@dataclass(frozen=True)
class AdapterMeta:
    bundle_id: str
    version: str
    parent_version: str = ""
    round: int = -1
    strategy: str = ""
    kind: str = ""
    agent: str = ""
    # The label histogram the device trained with under balanced softmax (`sdk.label_prior`): its
    # inference adds the prior back. Empty: the adapter carries its prior itself (plain CE).
    label_prior: tuple[float, ...] = ()

    def to_strings(self) -> dict[str, str]:
        out = {k: str(getattr(self, k)) for k in _KNOWN}
        if self.label_prior:
            out["label_prior"] = label_prior.encode(self.label_prior)
        out[_FORMAT_KEY] = ADAPTER_FORMAT
        return dict(sorted(out.items()))

    @classmethod
    def from_strings(cls, meta: Mapping[str, str] | None, where: str) -> AdapterMeta:
        meta = dict(meta or {})
        fmt = meta.pop(_FORMAT_KEY, None)
        if fmt is None:
            raise AdapterError(f"{where}: not a fedclip adapter (no {_FORMAT_KEY} in metadata)")
        if fmt != ADAPTER_FORMAT:
            raise AdapterError(
                f"{where}: adapter format {fmt!r} is not supported (expected {ADAPTER_FORMAT})"
            )
        for key in _REQUIRED:
            if key not in meta:
                raise AdapterError(f"{where}: metadata field {key!r} is missing")
        for key in sorted(set(meta) - set(_KNOWN) - set(_OPTIONAL)):
            if key not in _warned_fields:  # newer writers may add fields; say so once
                _warned_fields.add(key)
                log.warning("%s: unknown adapter metadata field %r ignored", where, key)
        try:
            rnd = int(meta.get("round", "-1"))
        except ValueError:
            raise AdapterError(f"{where}: metadata field 'round' is not an integer") from None
        return cls(
            bundle_id=meta["bundle_id"],
            version=meta["version"],
            parent_version=meta.get("parent_version", ""),
            round=rnd,
            strategy=meta.get("strategy", ""),
            kind=meta.get("kind", ""),
            agent=meta.get("agent", ""),
            label_prior=label_prior.decode(meta["label_prior"], where) if "label_prior" in meta else (),
        )


_ST_DTYPES = {
    np.dtype(name): code
    for name, code in [
        ("float64", "F64"),
        ("float32", "F32"),
        ("float16", "F16"),
        ("int64", "I64"),
        ("int32", "I32"),
        ("int16", "I16"),
        ("int8", "I8"),
        ("uint64", "U64"),
        ("uint32", "U32"),
        ("uint16", "U16"),
        ("uint8", "U8"),
        ("bool", "BOOL"),
    ]
}


def encode_tensors(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """A safetensors blob with sorted names and sorted metadata: equal inputs give equal bytes.

    Written here rather than by `safetensors.numpy.save`, whose metadata order follows a randomized
    hash map (the same adapter would get a new content address on every save). The blob is plain
    safetensors; `decode_tensors` reads it with the safetensors library, which validates it.
    """
    header: dict[str, object] = {"__metadata__": {str(k): str(v) for k, v in sorted(metadata.items())}}
    chunks, offset = [], 0
    for name, arr in sorted(tensors.items()):
        arr = np.asarray(arr)
        dtype = _ST_DTYPES.get(arr.dtype.newbyteorder("="))
        if dtype is None:
            raise AdapterError(f"tensor {name!r}: dtype {arr.dtype} cannot be stored")
        data = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()
        end = offset + len(data)
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, end]}
        chunks.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # 8-byte aligned data, as the reference writer does
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def decode_tensors(blob: bytes, where: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a safetensors blob; any malformation becomes an AdapterError naming `where`."""
    if len(blob) < 8:
        raise AdapterError(f"{where}: payload too short to be safetensors ({len(blob)} bytes)")
    header_len = int.from_bytes(blob[:8], "little")
    if header_len <= 0 or header_len > len(blob) - 8:
        raise AdapterError(f"{where}: not a safetensors payload (bad header length)")
    try:
        tensors = st_load(blob)
        header = json.loads(blob[8 : 8 + header_len])
    # KeyError: safetensors' numpy loader has no numpy type for some dtypes (BF16, F8).
    except (SafetensorError, ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError) as e:
        raise AdapterError(
            f"{where}: not a valid safetensors payload ({str(e).splitlines()[0][:120]})"
        ) from None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise AdapterError(f"{where}: safetensors metadata must map strings to strings")
    return tensors, meta


def adapter_bytes(tensors: Mapping[str, np.ndarray], meta: AdapterMeta) -> bytes:
    return encode_tensors(tensors, meta.to_strings())


def adapter_from_bytes(blob: bytes, where: str = "adapter") -> tuple[dict[str, np.ndarray], AdapterMeta]:
    tensors, raw = decode_tensors(blob, where)
    return tensors, AdapterMeta.from_strings(raw, where)


def save_adapter(path: str | Path, tensors: Mapping[str, np.ndarray], meta: AdapterMeta) -> Path:
    """Write atomically: a reader never sees half a file, a crash never leaves one."""
    return atomic_write(path, adapter_bytes(tensors, meta))


class AdapterFiles:
    """`save_adapter` / `load_adapter` / `_specs` for a trainer (ORT or step backend): the class brings
    `manifest`, `get_tensors(which)` and `set_tensors(tensors, where=...)`; an adapter of another
    bundle is refused either way."""

    manifest: Manifest

    def get_tensors(self, which: Literal["trainable", "exchanged"] = "trainable") -> dict[str, np.ndarray]:
        raise NotImplementedError  # the trainer class brings it

    def set_tensors(self, tensors: Mapping[str, np.ndarray], where: str = "adapter") -> None:
        raise NotImplementedError  # the trainer class brings it

    def _specs(self, which: Literal["trainable", "exchanged"]) -> tuple[TensorSpec, ...]:
        if which == "trainable":
            return self.manifest.trainable
        if which == "exchanged":
            return self.manifest.exchanged
        raise ValueError(f"which must be 'trainable' or 'exchanged', got {which!r}")

    def save_adapter(
        self, path: str | Path, meta: AdapterMeta, which: Literal["trainable", "exchanged"] = "exchanged"
    ) -> Path:
        if meta.bundle_id != self.manifest.bundle_id:
            raise AdapterError(
                f"{path}: adapter metadata names bundle {meta.bundle_id[:12]}, not this bundle"
            )
        return save_adapter(path, self.get_tensors(which), meta)

    def load_adapter(self, path: str | Path) -> AdapterMeta:
        tensors, meta = load_adapter(path)
        if meta.bundle_id and meta.bundle_id != self.manifest.bundle_id:
            raise AdapterError(
                f"{path}: adapter was made for bundle {meta.bundle_id[:12]}, "
                f"this bundle is {self.manifest.bundle_id[:12]}"
            )
        self.set_tensors(tensors, where=str(path))
        return meta


def load_adapter(path: str | Path) -> tuple[dict[str, np.ndarray], AdapterMeta]:
    path = Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise AdapterError(f"{path}: cannot read adapter ({e.strerror or e})") from None
    return adapter_from_bytes(blob, str(path))


def check_tensors(
    tensors: Mapping[str, np.ndarray],
    specs: Iterable[TensorSpec],
    where: str,
    require_all: bool = True,
    finite_checked: bool = False,
) -> dict[str, np.ndarray]:
    """Validate names, shapes, dtypes and finiteness against the manifest; return float32 copies.
    `finite_checked`: the tensors come from `wire.decode`, which refused non-finite values already."""
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(tensors) - set(by_name))
    if unknown:
        raise AdapterError(f"{where}: unknown tensor {unknown[0]!r} (not in the bundle's adapter)")
    if require_all:
        missing = sorted(set(by_name) - set(tensors))
        if missing:
            raise AdapterError(f"{where}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    out = {}
    for name, arr in tensors.items():
        spec = by_name[name]
        arr = np.asarray(arr)
        if arr.dtype != np.dtype(spec.dtype):
            raise AdapterError(f"{where}: tensor {name!r} has dtype {arr.dtype}, expected {spec.dtype}")
        if tuple(arr.shape) != tuple(spec.shape):
            raise AdapterError(
                f"{where}: tensor {name!r} has shape {list(arr.shape)}, expected {list(spec.shape)}"
            )
        if not finite_checked and not np.isfinite(arr).all():  # the method: no dispatch layer
            raise AdapterError(f"{where}: tensor {name!r} has non-finite values")
        out[name] = np.array(arr, copy=True)
    return out


def check_adapter(
    tensors: Mapping[str, np.ndarray], manifest: Manifest, where: str, exchanged_only: bool = True
) -> dict[str, np.ndarray]:
    specs = manifest.exchanged if exchanged_only else manifest.trainable
    return check_tensors(tensors, specs, where)
