"""Frozen weights through one memory map per process, shared by every ONNX Runtime session.

A step-format bundle keeps the frozen weights of all its graphs in one `weights.bin`. ONNX Runtime
maps that file itself, but once per session: the step, step_eval and inference sessions of one agent
each map it again, and every mapping's touched pages count in the process's resident memory
(ViT-B-32: 0.6 GB per session). With the bundle's `weights_index.json` (written by the exporter,
covered by the manifest's sha256) the agent maps the file once and hands the same pages to every
session as initializers. Bundles without the index load as before.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from fedclip.sdk.bundle_layout import INDEX_FILE, INDEX_FORMAT
from fedclip.sdk.errors import BundleError
from fedclip.sdk.manifest import Manifest

_DTYPES = {"float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool"}

# (real path, size, mtime) -> the process's one read-only map of that weights file
_MAPS: dict[tuple[str, int, int], np.memmap] = {}


def _map(path: Path) -> np.memmap:
    try:
        st = path.stat()
    except OSError as e:
        raise BundleError(f"{path}: cannot read the weights file ({e.strerror or e})") from None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _MAPS:
        _MAPS[key] = np.memmap(path, dtype=np.uint8, mode="r")
    return _MAPS[key]


def _index(bundle_dir: Path, manifest: Manifest) -> dict | None:
    # Only an index the manifest vouches for: its offsets decide what every weight reads.
    if INDEX_FILE not in manifest.files or not (bundle_dir / INDEX_FILE).is_file():
        return None
    where = bundle_dir / INDEX_FILE
    try:
        doc = json.loads(where.read_text())
        if doc.get("format") != INDEX_FORMAT or not isinstance(doc.get("graphs"), dict):
            raise ValueError("unknown format")
        weights = str(doc["weights"])
        if os.path.basename(weights) != weights or weights not in manifest.files:
            raise ValueError(f"weights file {weights!r} is not a file of the bundle")
        return doc
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BundleError(f"{where}: unreadable weights index ({e})") from None


def shared_initializers(
    bundle_dir: Path, manifest: Manifest, graph_file: str, skip: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """Initializer name -> read-only array over the process's one map of the weights file, for the
    frozen weights of `graph_file` (minus `skip`, which the caller overrides). Empty without an index."""
    doc = _index(bundle_dir, manifest)
    if doc is None or graph_file not in doc["graphs"]:
        return {}
    mm = _map(bundle_dir / doc["weights"])
    skip = set(skip)
    out = {}
    for name, e in doc["graphs"][graph_file].items():
        if name in skip:
            continue
        try:
            off, length, shape, dtype = int(e["offset"]), int(e["length"]), tuple(e["shape"]), e["dtype"]
            if dtype not in _DTYPES:
                raise ValueError(f"dtype {dtype!r}")
            dt = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(np.uint16)
            if off < 0 or off + length > mm.shape[0] or math.prod(shape) * dt.itemsize != length:
                raise ValueError(f"offset {off} + length {length} does not fit shape {list(shape)}")
        except (KeyError, TypeError, ValueError) as err:
            raise BundleError(f"{bundle_dir / INDEX_FILE}: bad entry for {name!r} ({err})") from None
        if dtype == "bfloat16":  # numpy has no bfloat16: ORT reads it from the model file itself
            continue
        out[name] = mm[off : off + length].view(dt).reshape(shape)
    return out


def add_shared_initializers(opts: Any, ort: Any, arrays: dict[str, np.ndarray], keep: list) -> None:
    """Give `arrays` to the session options as initializers; `keep` holds them as long as the session."""
    for name, arr in sorted(arrays.items()):
        value = ort.OrtValue.ortvalue_from_numpy(arr)
        keep.append((arr, value))
        opts.add_initializer(name, value)
