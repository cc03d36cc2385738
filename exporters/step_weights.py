"""One external-data file for the frozen weights of every graph in a bundle.

The exporters name and lay out frozen weights differently (the dynamo exporter renames them), so
tensors are matched by content: a tensor whose bytes are already in the shared file points at them,
anything new is appended. Existing bytes never move, so graphs written earlier stay valid.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import onnx
from onnx import TensorProto

from fedclip.sdk.bundle_layout import INDEX_FILE, INDEX_FORMAT

ALIGN = 64  # keeps float tensors aligned for ORT's loader, which may memory-map them
MIN_BYTES = 1024


def _external(t: TensorProto) -> dict[str, str] | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in t.external_data}


def _read_external(info: dict[str, str], base: Path) -> bytes:
    with open(base / info["location"], "rb") as f:
        f.seek(int(info.get("offset", 0)))
        length = info.get("length")
        return f.read(int(length)) if length is not None else f.read()


def _tensor_bytes(t: TensorProto, base: Path) -> bytes | None:
    info = _external(t)
    if info is not None:
        return _read_external(info, base)
    if t.HasField("raw_data"):
        return t.raw_data
    return None  # typed fields (float_data, ...): small constants, left as they are


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_index(weights: Path) -> dict[str, tuple[int, int]]:
    """sha256 -> (offset, length) of every tensor that a graph next to `weights` stores there."""
    index: dict[str, tuple[int, int]] = {}
    if not weights.is_file():
        return index
    for model_path in sorted(weights.parent.glob("*.onnx")):
        model = onnx.load(str(model_path), load_external_data=False)
        for t in model.graph.initializer:
            info = _external(t)
            if info is None or info.get("location") != weights.name:
                continue
            off, length = int(info.get("offset", 0)), int(info["length"])
            with open(weights, "rb") as f:
                f.seek(off)
                index.setdefault(_digest(f.read(length)), (off, length))
    return index


class WeightsFile:
    """A bundle's shared weights file and the index of what it holds, for one export.

    The index (sha256 -> offset, length) is read from the graphs already next to the file once,
    then kept up to date as tensors are appended: each graph written after that hashes only its own
    tensors, once, instead of re-reading every earlier graph's weights.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.index = weights_index(self.path)
        self.placed: dict[object, tuple[int, int]] = {}  # caller's key -> (offset, length)
        self._out: BinaryIO | None = None

    def place(self, data: bytes, key: object = None) -> tuple[int, int]:
        """(offset, length) of `data` in the file, appended (aligned) unless already there; `key`: a
        name for the same bytes placed again (no re-hash). Durable after `sync`."""
        if key is not None and key in self.placed:
            return self.placed[key]
        digest = _digest(data)
        if digest not in self.index:
            if self._out is None:
                self._out = open(self.path, "ab")  # noqa: SIM115  (held until close)
            self._out.write(b"\0" * (-self._out.tell() % ALIGN))
            self.index[digest] = (self._out.tell(), len(data))
            self._out.write(data)
        if key is not None:
            self.placed[key] = self.index[digest]
        return self.index[digest]

    def sync(self) -> None:
        """What was appended, on disk: before a graph that points at it is written."""
        if self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())

    def close(self) -> None:
        self.sync()
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> WeightsFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def refer(self, t: TensorProto, data: bytes, key: object = None) -> bool:
        """Point `t` at `data` in the file; True if it was appended rather than found."""
        known = len(self.index)
        off, length = self.place(data, key)
        t.ClearField("raw_data")
        del t.external_data[:]
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(off)), ("length", str(length))):
            entry = t.external_data.add()
            entry.key, entry.value = k, v
        return len(self.index) > known


@contextlib.contextmanager
def opened(weights: str | Path | WeightsFile) -> Iterator[WeightsFile]:
    """`weights` as a WeightsFile: the one given, or the file at that path (closed after)."""
    if isinstance(weights, WeightsFile):
        yield weights
        return
    with WeightsFile(Path(weights)) as shared:
        yield shared


def save_graph(model: onnx.ModelProto, dst: Path) -> None:
    """`model` (its weights external or small) written to `dst` atomically."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    onnx.save_model(model, str(tmp))
    os.replace(tmp, dst)


def share_weights(
    src: Path, dst: Path, weights: Path | WeightsFile, min_bytes: int = MIN_BYTES
) -> dict[str, int]:
    """Rewrite the graph `src` as `dst` with its initializers of `min_bytes` or more in `weights`.

    `weights` must sit in `dst`'s folder (ONNX external data is relative to the graph). Returns
    byte counts: `shared` (found already), `added` (appended). `src` may equal `dst`.
    """
    src, dst = Path(src), Path(dst)
    with opened(weights) as shared:
        if shared.path.parent.resolve() != dst.parent.resolve():
            raise ValueError(f"{shared.path} must be in the folder of {dst}")
        model = onnx.load(str(src), load_external_data=False)
        counts = {"shared": 0, "added": 0}
        for t in model.graph.initializer:
            data = _tensor_bytes(t, src.parent)
            if data is None:
                continue
            if len(data) < min_bytes:
                if _external(t) is not None:  # small tensor from another file: embed it
                    del t.external_data[:]
                    t.data_location = TensorProto.DEFAULT
                    t.raw_data = data
                continue
            counts["added" if shared.refer(t, data) else "shared"] += len(data)
        shared.sync()
        save_graph(model, dst)
    return counts


def write_weights_index(bundle_dir: Path, graph_files: list[str], weights_name: str) -> str:
    """Write `weights_index.json`: for each graph, its initializers stored in `weights_name` with
    offset, length, dtype and shape. Agents read frozen weights through ONE memory map of the file
    with it and hand the same pages to every session (`fedclip.device_agent.shared_weights`), where
    ONNX Runtime would map the file once per session. Returns the file name."""
    import json

    from onnx import helper

    bundle_dir = Path(bundle_dir)
    graphs: dict[str, dict[str, dict]] = {}
    for file in sorted(graph_files):
        model = onnx.load(str(bundle_dir / file), load_external_data=False)
        entries = {}
        for t in model.graph.initializer:
            info = _external(t)
            if info is None or info.get("location") != weights_name:
                continue
            entries[t.name] = {
                "offset": int(info.get("offset", 0)),
                "length": int(info["length"]),
                "dtype": helper.tensor_dtype_to_np_dtype(t.data_type).name,
                "shape": [int(d) for d in t.dims],
            }
        graphs[file] = entries
    doc = {"format": INDEX_FORMAT, "weights": weights_name, "graphs": graphs}
    tmp = bundle_dir / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, bundle_dir / INDEX_FILE)
    return INDEX_FILE
