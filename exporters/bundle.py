"""The whole export: base model + adapters -> ONNX graphs + ORT artifacts + sealed manifest.

The bundle is built in a temp dir next to `out` and renamed into place at the end, so a failed
export leaves nothing half-written. Everything is seeded, so equal configs give equal bytes and
an equal bundle_id.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Literal

import torch

from fedclip.exporters import onnx_export, step_bundle, step_graph, tasks, text_encoder
from fedclip.exporters.adapted import (
    DUMMY_BATCH,
    AdaptedModel,
    build_adapted_model,
    dummy_inputs,
    step_cache_key,
    task_graph,
    tokenize,
)
from fedclip.exporters.background import Background
from fedclip.exporters.config import ExportConfig
from fedclip.exporters.export_cache import ExportCache
from fedclip.exporters.lora import (
    adapter_tensors,
    load_adapter_into_torch,
    merge_adapters,
    unmerge_adapters,
)
from fedclip.exporters.models import copy_vocab
from fedclip.exporters.phases import Phases, phase, progress_bar, recording
from fedclip.sdk.errors import ExportError, FedclipError
from fedclip.sdk.manifest import (
    FORMAT_VERSION,
    LABEL_BIAS,
    AdapterSpec,
    BaseModel,
    GraphSpec,
    Manifest,
    TaskSpec,
    TensorSpec,
    TokenizerSpec,
)

__all__ = [
    "AdaptedModel",
    "adapter_spec",
    "adapter_tensors",
    "build_adapted_model",
    "export_bundle",
    "load_adapter_into_torch",
    "merge_adapters",
    "task_spec",
    "TorchTwin",
    "torch_twin",
    "tokenize",
    "unmerge_adapters",
]

log = logging.getLogger(__name__)

TRAINING, EVAL, OPTIMIZER = "training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"
INFERENCE, IMAGE_ENCODER = "inference_model.onnx", "image_encoder.onnx"
VOCAB = "tokenizer/bpe_simple_vocab_16e6.txt.gz"
TrainInput = Literal["image", "image_embeds"]  # what the training graph takes (Manifest.train_input)


def adapter_spec(cfg: ExportConfig) -> AdapterSpec:
    return AdapterSpec(
        kind=cfg.adapter,
        rank=cfg.rank,
        alpha=cfg.alpha,
        targets=tuple(cfg.targets),
        towers=tuple(cfg.towers),
        init=cfg.init,
        seed=cfg.seed,
    )


def task_spec(cfg: ExportConfig) -> TaskSpec:
    if cfg.task == "contrastive":
        return TaskSpec(kind="contrastive", labels=tuple(cfg.labels), prompt=cfg.prompt)
    return TaskSpec(kind="classify", labels=tuple(cfg.labels), prompt=cfg.prompt)


@dataclass
class TorchTwin:
    """PyTorch modules computing what a bundle's graphs compute (for parity tests, benchmarks)."""

    adapted: AdaptedModel
    graph: torch.nn.Module  # like training/eval: (x, labels|text) -> (loss, logits) | loss
    inference: torch.nn.Module  # like inference_model.onnx
    image_encoder: torch.nn.Module | None  # like image_encoder.onnx (text-tower-only bundles)


def torch_twin(manifest: Manifest, model: str | None = None, pretrained: str | None = None) -> TorchTwin:
    """Rebuild the PyTorch side of a bundle from its manifest (same seed, so same initial tensors).

    `model` defaults to the manifest's base model name; pass the JSON path for JSON-config bundles.
    """
    spec = manifest.adapter
    adapted = build_adapted_model(
        model or manifest.base_model.name, spec, pretrained or manifest.base_model.pretrained
    )
    trainable = {t.name for t in manifest.tensors if t.trainable}
    for name, p in adapted.model.named_parameters():
        p.requires_grad_(name in trainable)
    return _twin(adapted, manifest.task)


def _twin(adapted: AdaptedModel, task: TaskSpec) -> TorchTwin:
    clip = adapted.model
    from_embeds = "vision" not in adapted.spec.towers
    text_adapted = "text" in adapted.spec.towers
    graph, _ = task_graph(adapted, task, from_embeds)
    inference: torch.nn.Module
    if task.kind == "classify":
        label_tokens = tokenize(task.prompts(), adapted.base.context_length)
        inference = tasks.ClassifyInference(clip, label_tokens, text_adapted)
    else:
        inference = tasks.ContrastiveInference(clip)
    encoder = tasks.ImageEncoder(clip) if from_embeds else None
    return TorchTwin(adapted=adapted, graph=graph, inference=inference, image_encoder=encoder)


def _tools() -> dict[str, str]:
    out = {}
    for dist in (
        "fedclip",
        "torch",
        "open_clip_torch",
        "onnx",
        "onnxruntime-training-cpu",
        "onnxruntime-training",
    ):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = pkg_version(dist)
    return out


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out: {out} already exists and is not an empty directory")
    parent = out.parent
    if not parent.is_dir():
        raise ExportError(f"--out: parent directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out: cannot write into {parent}")


def _write_graphs(
    adapted: AdaptedModel,
    task: TaskSpec,
    tmp: Path,
    formats: tuple[str, ...] = ("ort-training",),
    cache: ExportCache | None = None,
) -> tuple[dict[str, GraphSpec], TrainInput, str | None]:
    """Writes the graphs; returns (graphs, train_input, initial tensors file or None)."""
    from_embeds = "vision" not in adapted.spec.towers
    train_input: TrainInput = "image_embeds" if from_embeds else "image"
    example = dummy_inputs(adapted, task, from_embeds)
    graphs: dict[str, GraphSpec] = {}

    twin = _twin(adapted, task)
    io_in: tuple[str, ...]
    io_out: tuple[str, ...]  # the training graph's outputs; the eval graph's are the same
    if task.kind == "classify":
        io_in, io_out = (train_input, "labels", LABEL_BIAS), ("loss", "logits")
    else:
        io_in, io_out = (train_input, "text"), ("loss",)
    eval_out = io_out
    pending = key = None
    if "step" in formats:
        # Traced in a forked child (`background`) while the other graphs are exported here.
        key = step_cache_key(adapted, twin.graph, task.kind, from_embeds)
        trace = functools.partial(
            _step_templates, twin.graph, adapted.trainable, example, io_in, eval_out, cache, key
        )
        pending = Background(trace, "tracing the step graphs")
    try:
        with pending.leaving_a_core() if pending is not None else contextlib.nullcontext():
            if "ort-training" in formats:
                with phase("exporting training graph"):
                    proto = onnx_export.export_onnx(twin.graph, example, io_in, io_out)
                with phase("generating ORT training artifacts"):
                    onnx_export.generate_training_artifacts(
                        proto, adapted.trainable, tmp, keep_outputs=("loss",)
                    )
                graphs["training"] = GraphSpec(file=TRAINING, inputs=io_in, outputs=("loss",))
                graphs["eval"] = GraphSpec(file=EVAL, inputs=io_in, outputs=eval_out)
                graphs["optimizer"] = GraphSpec(file=OPTIMIZER, inputs=(), outputs=())

            with phase("exporting inference graph"):
                size = adapted.base.preprocess.image_size
                image = torch.randn(DUMMY_BATCH, 3, size, size, generator=torch.Generator().manual_seed(1))
                inf_in: tuple[str, ...]
                args: tuple[torch.Tensor, ...]
                if task.kind == "classify":
                    inf_in, inf_out, args = ("image",), ("logits", "image_embeds"), (image,)
                else:
                    inf_in, inf_out, args = (
                        ("image", "text"),
                        ("image_embeds", "text_embeds"),
                        (image, example[1]),
                    )
                proto = onnx_export.export_onnx(twin.inference, args, inf_in, inf_out)
                onnx_export.make_overridable(proto, adapted.names)
                onnx_export.save(proto, tmp / INFERENCE)
                graphs["inference"] = GraphSpec(file=INFERENCE, inputs=inf_in, outputs=inf_out)
            with phase("exporting the text encoder"):
                # Open vocabulary on the device: any labels or prompts, through the adapted text tower.
                ctx = adapted.base.context_length
                graphs["text_encoder"] = text_encoder.write_text_encoder(
                    adapted.model, adapted.names, ctx, tmp
                )

            if twin.image_encoder is not None:  # text-tower-only bundles (from_embeds)
                with phase("exporting image encoder"):
                    proto = onnx_export.export_onnx(
                        twin.image_encoder, (image,), ("image",), ("image_embeds",)
                    )
                    onnx_export.save(proto, tmp / IMAGE_ENCODER)
                    graphs["image_encoder"] = GraphSpec(
                        file=IMAGE_ENCODER, inputs=("image",), outputs=("image_embeds",)
                    )
        initial = None
        if pending is not None:
            with phase("exporting step graphs"):
                # The step graphs and the inference graph (and image encoder) share one weights.bin.
                graphs, initial = step_bundle.write_step_format(
                    twin.graph,
                    adapted.trainable,
                    example,
                    io_in,
                    eval_out,
                    tmp,
                    graphs,
                    cache=cache,
                    cache_key=key,
                    templates=_with_counts(pending.result(), cache),
                )
    finally:
        if pending is not None:
            pending.cancel()  # nothing if its result was taken
    return graphs, train_input, initial


def _step_templates(module, trainable, example, io_in, eval_out, cache, key):
    """`step_graph.step_templates` and the cache's counters after it (the child's, when forked)."""
    templates = step_graph.step_templates(
        module, trainable, example, io_in, eval_out, cache=cache, cache_key=key
    )
    return templates, None if cache is None else (cache.hits, cache.misses, cache.rebuilt, cache.evicted)


def _with_counts(result, cache: ExportCache | None) -> tuple[bytes, bytes]:
    """The templates; what the cache found and built while tracing (in a forked child perhaps) kept
    in `cache` (the CLI reports it)."""
    templates, counts = result
    if cache is not None and counts is not None:
        cache.hits, cache.misses, cache.rebuilt, cache.evicted = counts
    return templates


def _tensor_specs(adapted: AdaptedModel) -> tuple[TensorSpec, ...]:
    params = dict(adapted.model.named_parameters())
    out = []
    for name in adapted.names:
        p = params[name]
        factor = name.rsplit(".", 1)[-1]
        exchanged = adapted.spec.kind == "lora" or factor == "lora_C"
        out.append(
            TensorSpec(name=name, shape=tuple(p.shape), trainable=p.requires_grad, exchanged=exchanged)
        )
    return tuple(out)


def _manifest(
    adapted: AdaptedModel,
    cfg: ExportConfig,
    task: TaskSpec,
    graphs: dict[str, GraphSpec],
    train_input: TrainInput,
    initial: str | None,
    tmp: Path,
) -> Manifest:
    # Every bundle has the text encoder graph, so every bundle needs the tokenizer.
    copy_vocab(tmp / Path(VOCAB).parent)
    tokenizer = TokenizerSpec(file=VOCAB, context_length=adapted.base.context_length)
    base = adapted.base
    return Manifest(
        format_version=FORMAT_VERSION,
        base_model=BaseModel(
            name=base.name,
            embed_dim=base.embed_dim,
            pretrained=base.pretrained,
            weights_sha256=base.weights_sha256,
        ),
        adapter=adapted.spec,
        task=task,
        preprocess=base.preprocess,
        tensors=_tensor_specs(adapted),
        graphs=graphs,
        train_input=train_input,
        checkpoint="checkpoint" if "ort-training" in cfg.formats else None,
        tokenizer=tokenizer,
        initial_tensors=initial,
        tools=_tools(),
    )


def export_bundle(
    cfg: ExportConfig,
    show_progress: bool = False,
    cache: ExportCache | None = None,
    phases: Phases | None = None,
) -> Manifest:
    """Build the bundle described by `cfg` at `cfg.out`; returns the sealed manifest.

    `cache`: traced step graphs come from / go to this export cache (None: trace every time).
    `phases`: records each phase's time and peak memory (the export profile)."""
    spec = adapter_spec(cfg)
    task = task_spec(cfg)
    out = Path(cfg.out).expanduser().absolute()
    _check_out(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"--out: cannot write into {out.parent} ({e.strerror})") from None
    formats = cfg.formats
    n_phases = 4 + ("vision" not in spec.towers) + 2 * ("ort-training" in formats) + ("step" in formats)
    phases = phases or Phases()
    try:
        with progress_bar(show_progress, n_phases, phases), recording(phases), torch.no_grad():
            with phase(f"building {cfg.model}"):
                adapted = build_adapted_model(cfg.model, spec, cfg.pretrained, tuple(cfg.train))
            graphs, train_input, initial = _write_graphs(adapted, task, tmp, cfg.formats, cache)
            with phase("writing manifest"):
                sealed = _manifest(adapted, cfg, task, graphs, train_input, initial, tmp).seal(tmp)
            if out.exists():
                out.rmdir()  # checked empty above
            os.replace(tmp, out)
        return sealed
    except FedclipError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        log.debug("export failed", exc_info=True)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise ExportError(f"export of {cfg.model} failed: {type(e).__name__}: {first}") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
