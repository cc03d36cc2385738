"""The step format of a bundle: `step` + `step_eval` graphs, their weights shared with inference.

`write_step_format` is what the bundle export calls while it builds a bundle; `add_step_format`
adds the format to a bundle exported without it (rebuilding the same seeded model) and reseals it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from fedclip.exporters.adapted import build_adapted_model, dummy_inputs, step_cache_key, task_graph
from fedclip.exporters.export_cache import ExportCache
from fedclip.exporters.step_graph import AdamW, export_step_graphs
from fedclip.exporters.step_weights import WeightsFile, share_weights, write_weights_index
from fedclip.sdk.adapters import encode_tensors
from fedclip.sdk.errors import ExportError
from fedclip.sdk.manifest import LABEL_BIAS, GraphSpec, Manifest

WEIGHTS_FILE = "weights.bin"
INITIAL_TENSORS = "initial_tensors.safetensors"
# Graphs whose frozen weights go into the shared file too (written before the step graphs).
SHARED_GRAPHS = ("inference", "image_encoder", "text_encoder")


def write_initial_tensors(task_module: nn.Module, trainable: Sequence[str], out_dir: Path) -> str:
    params = dict(task_module.named_parameters())
    arrays = {n: params[n].detach().cpu().float().numpy().copy() for n in trainable}
    (Path(out_dir) / INITIAL_TENSORS).write_bytes(encode_tensors(arrays, {"fedclip_initial_tensors": "1"}))
    return INITIAL_TENSORS


def write_step_format(
    task_module: nn.Module,
    trainable: Sequence[str],
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    eval_outputs: Sequence[str],
    out_dir: str | Path,
    graphs: dict[str, GraphSpec],
    *,
    adamw: AdamW = AdamW(),
    cache: ExportCache | None = None,
    cache_key: dict | None = None,
    templates: tuple[bytes, bytes] | None = None,
) -> tuple[dict[str, GraphSpec], str]:
    """Write the step format into `out_dir`; returns (`graphs` + step/step_eval, initial_tensors file).

    `graphs` are the bundle's graphs written so far: the inference graph and image encoder among them
    move their frozen weights into the shared `weights.bin` first, so the step graphs reuse them.
    `templates`: the step graphs without weights (`step_graph.step_templates`), traced here if None.
    """
    out_dir = Path(out_dir)
    with WeightsFile(out_dir / WEIGHTS_FILE) as shared:  # one index for every graph of the bundle
        for key in SHARED_GRAPHS:
            if key in graphs:
                path = out_dir / graphs[key].file
                share_weights(path, path, shared)
        step_graphs = export_step_graphs(
            task_module,
            trainable,
            example_inputs,
            input_names,
            eval_outputs,
            out_dir,
            adamw=adamw,
            weights_file=shared,
            cache=cache,
            cache_key=cache_key,
            templates=templates,
        )
    initial = write_initial_tensors(task_module, trainable, out_dir)
    graphs = {**graphs, **step_graphs}
    sharing = [g.file for key, g in graphs.items() if key in (*SHARED_GRAPHS, *step_graphs)]
    write_weights_index(out_dir, sharing, WEIGHTS_FILE)
    return graphs, initial


def add_step_format(
    bundle_dir: str | Path,
    *,
    model: str | None = None,
    adamw: AdamW = AdamW(),
    cache: ExportCache | None = None,
) -> Manifest:
    """Add the step format to an exported bundle; returns the resealed manifest (a new bundle id).

    The model is rebuilt from the manifest (same name, weights and adapter seed give the same
    tensors); pass `model` when the bundle was exported from a JSON config file. The bundle is
    rewritten in a copy that replaces it at the end, so a failure leaves it as it was.
    """
    bundle_dir = Path(bundle_dir)
    manifest = Manifest.load(bundle_dir)
    if "step" in manifest.graphs:
        raise ExportError(f"{bundle_dir}: the bundle already has a step graph")
    factors = tuple(sorted({t.name.rsplit("_", 1)[-1] for t in manifest.trainable}))
    adapted = build_adapted_model(
        model or manifest.base_model.name, manifest.adapter, manifest.base_model.pretrained, factors
    )
    if adapted.trainable != [t.name for t in manifest.trainable]:
        raise ExportError(f"{bundle_dir}: the rebuilt model's trainable tensors differ from the manifest's")
    from_embeds = manifest.train_input == "image_embeds"
    task_module, eval_outputs = task_graph(adapted, manifest.task, from_embeds)
    work = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.step-", dir=bundle_dir.parent))
    try:
        shutil.copytree(bundle_dir, work, dirs_exist_ok=True)
        io_in = tuple(manifest.graphs["training"].inputs) if "training" in manifest.graphs else None
        if io_in is None:
            io_in = (manifest.train_input, "text")
            if manifest.task.kind == "classify":
                io_in = (manifest.train_input, "labels", LABEL_BIAS)[: 2 + (manifest.format_version > 1)]
        graphs, initial = write_step_format(
            task_module,
            adapted.trainable,
            # a format-1 bundle's graphs take no label_bias: its step graphs do not either
            dummy_inputs(adapted, manifest.task, from_embeds)[: len(io_in)],
            io_in,
            eval_outputs,
            work,
            dict(manifest.graphs),
            adamw=adamw,
            cache=cache,
            cache_key=step_cache_key(adapted, task_module, manifest.task.kind, from_embeds),
        )
        sealed = dataclasses.replace(manifest, graphs=graphs, initial_tensors=initial).seal(work)
        old = bundle_dir.with_name(f".{bundle_dir.name}.old")
        os.replace(bundle_dir, old)
        os.replace(work, bundle_dir)
        shutil.rmtree(old, ignore_errors=True)
        return sealed
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
