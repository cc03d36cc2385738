"""A step graph's template from the export cache (or traced), and the graph written with a model's
weights: into the bundle's shared weights file (`step_weights.WeightsFile`) or its own external data."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import onnx

from fedclip.exporters.graph_template import fill_shared, fill_weights
from fedclip.exporters.phases import phase
from fedclip.exporters.step_weights import WeightsFile, opened, save_graph


def template(cached, build) -> bytes:
    """`build()`, or the cache's entry for it; `cached`: (cache, key) or None (no cache)."""
    if cached is None:
        return build()
    cache, key = cached
    return cache.get_or_build(key, build)


@contextlib.contextmanager
def shared_file(out_dir: Path, weights_file: str | WeightsFile | None) -> Iterator[WeightsFile | None]:
    """The shared weights file `weights_file` names in `out_dir` (closed after, if opened here)."""
    if weights_file is None:
        yield None
        return
    with opened(weights_file if isinstance(weights_file, WeightsFile) else out_dir / weights_file) as shared:
        yield shared


def write_graph(
    template: bytes, frozen, out_dir: Path, file: str, weights_file: str | WeightsFile | None
) -> None:
    """`template` filled with `frozen` as `out_dir/file`, its weights in the shared `weights_file`
    (a name in `out_dir`, or an open WeightsFile) or, if None, in the graph's own external data."""
    with phase(f"{file}: writing weights"), shared_file(out_dir, weights_file) as shared:
        if shared is None:
            save_external(fill_weights(template, frozen), out_dir / file)
            return
        model = fill_shared(template, frozen, shared)
        shared.sync()  # the weights before the graph that points at them
        save_graph(model, out_dir / file)


def save_external(model: onnx.ModelProto, path: Path) -> None:
    """`model` at `path`, its tensors of 1 KiB or more in `<path>.data`."""
    onnx.save_model(
        model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=1024
    )


def cache_entry(cache, key: dict | None, graph: str, frozen: dict, args, inputs, outputs, **extra):
    """(cache, full key) when the caller gave both; the key adds all this graph's shapes and names."""
    if cache is None or key is None:
        return None
    doc = {
        **key,
        "graph": graph,
        "frozen": [(n, list(t.shape), str(t.dtype)) for n, t in frozen.items()],
        "args": [(list(a.shape), str(a.dtype), a.requires_grad) for a in args],
        "inputs": list(inputs),
        "outputs": list(outputs),
        **extra,
    }
    return cache, doc
