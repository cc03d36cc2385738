"""The portable training step: forward, backward and AdamW as ONE ordinary ONNX graph.

`step` graph: (data inputs, `step`, `lr`, every trainable tensor, its AdamW moments) ->
(`loss`, `step_out`, new tensors, new moments). Frozen weights are initializers, the ops are plain
ai.onnx (opset 18), so any ONNX Runtime build (no training API) can train a bundle with it.
`step_eval` graph: (data inputs, trainable tensors) -> the task graph's outputs (`loss`, `logits`).

Why this route: torch.export cannot trace `torch.func.grad` nor `autograd.grad` inside `forward`,
but `make_fx` traces forward and `autograd.grad` into an FX graph of aten ops, which the dynamo ONNX
exporter's translation takes once it is wrapped as an ExportedProgram (`step_fx`, `step_batch`: one
fake-mode trace at a static batch made dynamic again, no torch.export); AdamW is then added to the
ONNX graph as nodes (`step_adamw`). `nll_loss_forward/backward` are decomposed while tracing because
onnxscript's nll_loss fakes its total weight, which would scale gradients by the batch size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path

import onnx
import torch
from torch import nn

from fedclip.exporters.export_cache import ExportCache
from fedclip.exporters.graph_template import (
    clear_weights,
    drop_outputs,
    forward_part,
    strip_weights,
)
from fedclip.exporters.phases import phase
from fedclip.exporters.step_adamw import GRAD, LOSS_OUT, AdamW, add_adamw
from fedclip.exporters.step_adamw import step_io as step_io  # the step graph's names (tests read them here)
from fedclip.exporters.step_files import cache_entry, shared_file, template, write_graph
from fedclip.exporters.step_trace import trace
from fedclip.exporters.step_weights import WeightsFile
from fedclip.sdk.errors import ExportError
from fedclip.sdk.manifest import GraphSpec

STEP_FILE = "step_model.onnx"
STEP_EVAL_FILE = "step_eval_model.onnx"


def _loss_of(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _frozen_tensors(module: nn.Module, trainable: Sequence[str]) -> dict[str, torch.Tensor]:
    """Every parameter and buffer the step does not train, by its module path."""
    skip = set(trainable)
    out = {n: p.detach() for n, p in module.named_parameters() if n not in skip}
    out.update(dict(module.named_buffers()))
    return out


def _grad_function(module: nn.Module, names: Sequence[str], frozen: Sequence[str], n_data: int, extras: bool):
    """(*frozen, *data, *trainable) -> (loss, the trainable tensors' gradients, with `extras` the
    task module's outputs after the loss); AdamW is added to the traced graph as ONNX (`step_adamw`)."""
    k = len(frozen)

    def grad_fn(*args):
        weights = dict(zip(frozen, args[:k], strict=True))
        data, params = args[k : k + n_data], args[k + n_data :]
        weights.update(zip(names, params, strict=True))
        out = torch.func.functional_call(module, weights, data)
        loss = _loss_of(out)
        tail = tuple(out[1:]) if extras and isinstance(out, (tuple, list)) else ()
        return (loss, *torch.autograd.grad(loss, params), *tail)

    return grad_fn


def _trace_step(fn, frozen, data, values, input_names, trainable, extra, adamw: AdamW) -> onnx.ModelProto:
    """The step graph: `fn` (`_grad_function`) traced, then AdamW added; outputs `extra` last."""
    grads = tuple(n + GRAD for n in trainable)
    traced_in, traced_out = (*input_names, *trainable), (LOSS_OUT, *grads, *extra)
    model = trace(fn, frozen, [*data, *values], len(data), traced_in, traced_out, STEP_FILE)
    add_adamw(model, len(data), trainable, adamw)
    return model


def _eval_function(module: nn.Module, names: Sequence[str], frozen: Sequence[str], n_data: int):
    k = len(frozen)

    def eval_fn(*args):
        weights = dict(zip(frozen, args[:k], strict=True))
        args = args[k:]
        weights.update(zip(names, args[n_data:], strict=True))
        out = torch.func.functional_call(module, weights, args[:n_data])
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    return eval_fn


def _free_batch_size(module: nn.Module, data: Sequence[torch.Tensor]) -> int:
    """A trace batch size equal to no other dimension.

    Symbolic tracing gives equal sizes one symbol (duck sizing); a batch of 8 next to 8 labels
    would tie the batch to the label count and lose the dynamic axis.
    """
    taken = {d for t in (*module.parameters(), *module.buffers(), *data) for d in t.shape}
    return next(b for b in range(5, 10_000) if b not in taken)


def _with_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    reps = -(-batch // t.shape[0])
    return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch].clone()


def _prepare(module: nn.Module, trainable: Sequence[str], example_inputs: Sequence[torch.Tensor]):
    params = dict(module.named_parameters())
    missing = [n for n in trainable if n not in params]
    if missing:
        raise ExportError(
            f"step graph: trainable tensor {missing[0]!r} is not a parameter of the task module"
        )
    if not trainable:
        raise ExportError("step graph: no trainable tensors")
    batch = _free_batch_size(module, example_inputs)
    data = [_with_batch(t.detach(), batch) for t in example_inputs]
    values = [params[n].detach().clone().float().requires_grad_(True) for n in trainable]
    return data, values


def export_step_graph(
    task_module: nn.Module,
    trainable: Sequence[str],
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    out_dir: str | Path,
    *,
    adamw: AdamW = AdamW(),
    weights_file: str | WeightsFile | None = None,
    file: str = STEP_FILE,
    cache: ExportCache | None = None,
    cache_key: dict | None = None,
) -> GraphSpec:
    """Write the training-step graph of `task_module` (forward returns the loss first) to `out_dir/file`.

    `input_names` name `example_inputs` (dim 0 of each is the batch). With `weights_file`, frozen
    weights go into that shared external-data file of `out_dir`, stored once whatever graph has them.
    """
    out_dir = Path(out_dir)
    data, values = _prepare(task_module, trainable, example_inputs)
    inputs, outputs = step_io(input_names, trainable)
    frozen = _frozen_tensors(task_module, trainable)
    weights = list(frozen.values())
    fn = _grad_function(task_module, list(trainable), list(frozen), len(data), extras=False)
    args = _step_args(data, values)
    adamw_doc = dataclasses.asdict(adamw)
    cached = cache_entry(cache, cache_key, "step", frozen, args, inputs, outputs, adamw=adamw_doc)

    def build() -> bytes:
        return strip_weights(_trace_step(fn, weights, data, values, input_names, trainable, (), adamw))

    write_graph(template(cached, build), weights, out_dir, file, weights_file)
    return GraphSpec(file=file, inputs=inputs, outputs=outputs)


def _step_args(data: list[torch.Tensor], values: list[torch.Tensor]) -> list[torch.Tensor]:
    step = torch.zeros(1, dtype=torch.int64)
    lr = torch.full((1,), 1e-3)
    zeros = [torch.zeros_like(v).detach() for v in values]
    prox = [torch.zeros(1), *(v.detach() for v in values)]  # prox_mu, the anchors
    return [*data, step, lr, *values, *zeros, *[z.clone() for z in zeros], *prox]


def export_step_eval_graph(
    task_module: nn.Module,
    trainable: Sequence[str],
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    out_dir: str | Path,
    *,
    weights_file: str | WeightsFile | None = None,
    file: str = STEP_EVAL_FILE,
    cache: ExportCache | None = None,
    cache_key: dict | None = None,
) -> GraphSpec:
    """The task graph's outputs with the trainable tensors as inputs (no initializers to override)."""
    out_dir = Path(out_dir)
    data, values = _prepare(task_module, trainable, example_inputs)
    values = [v.detach() for v in values]
    inputs = (*input_names, *trainable)
    frozen = _frozen_tensors(task_module, trainable)
    fn = _eval_function(task_module, list(trainable), list(frozen), len(data))
    with torch.no_grad():
        n_out = len(fn(*frozen.values(), *data, *values))
    if n_out != len(output_names):
        raise ExportError(
            f"step eval graph: the task module returns {n_out} outputs, {len(output_names)} named"
        )
    args = [*data, *values]
    cached = cache_entry(cache, cache_key, "step_eval", frozen, args, inputs, output_names)
    _export_into(
        fn,
        list(frozen.values()),
        args,
        len(data),
        inputs,
        tuple(output_names),
        out_dir,
        file,
        weights_file,
        cached,
    )
    return GraphSpec(file=file, inputs=inputs, outputs=tuple(output_names))


def _export_into(
    fn,
    frozen,
    args,
    n_data,
    inputs,
    outputs,
    out_dir: Path,
    file: str,
    weights_file: str | WeightsFile | None,
    cached,
) -> None:
    """Trace (or take from the cache), fill in this model's weights, write; `cached`: (cache, key) or None."""

    def build() -> bytes:
        return strip_weights(trace(fn, frozen, args, n_data, inputs, outputs, file))

    write_graph(template(cached, build), frozen, out_dir, file, weights_file)


def step_templates(
    task_module: nn.Module,
    trainable: Sequence[str],
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    eval_outputs: Sequence[str],
    *,
    adamw: AdamW = AdamW(),
    cache: ExportCache | None = None,
    cache_key: dict | None = None,
) -> tuple[bytes, bytes]:
    """The `step` and `step_eval` graphs without their weights (`graph_template`), from one trace:
    the eval graph is the forward part of the step graph (`graph_template.forward_part`). With
    `cache` and `cache_key` (what identifies the task module's code path: architecture, adapter
    spec, task; see bundle.py) they come from / go to the export cache."""
    data, values = _prepare(task_module, trainable, example_inputs)
    frozen = _frozen_tensors(task_module, trainable)
    weights = list(frozen.values())
    step_args, eval_args = _step_args(data, values), [*data, *(v.detach() for v in values)]
    inputs, outputs = step_io(input_names, trainable)
    eval_inputs, eval_outputs = (*input_names, *trainable), tuple(eval_outputs)
    extra = eval_outputs[1:]  # the step graph carries them while the eval graph is cut out of it
    fn = _grad_function(task_module, list(trainable), list(frozen), len(data), extras=True)
    step_c = cache_entry(
        cache, cache_key, "step", frozen, step_args, inputs, outputs, adamw=dataclasses.asdict(adamw)
    )
    eval_c = cache_entry(
        cache, cache_key, "step_eval", frozen, eval_args, eval_inputs, eval_outputs, cut=True
    )

    @functools.cache
    def both() -> tuple[bytes, bytes]:
        model = _trace_step(fn, weights, data, values, input_names, trainable, extra, adamw)
        clear_weights(model)  # first, so the cut copies no weight data (ViT-B-32: 0.6 GB)
        with phase(f"{STEP_EVAL_FILE}: cut from the step graph"):
            try:
                eval_model = forward_part(model, eval_inputs, eval_outputs)
            except ValueError as e:
                raise ExportError(f"{STEP_EVAL_FILE}: cannot cut it from the step graph ({e})") from None
            drop_outputs(model, extra)
        return strip_weights(model), strip_weights(eval_model)

    return template(step_c, lambda: both()[0]), template(eval_c, lambda: both()[1])


def export_step_graphs(
    task_module: nn.Module,
    trainable: Sequence[str],
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    eval_outputs: Sequence[str],
    out_dir: str | Path,
    *,
    adamw: AdamW = AdamW(),
    weights_file: str | WeightsFile | None = None,
    cache: ExportCache | None = None,
    cache_key: dict | None = None,
    templates: tuple[bytes, bytes] | None = None,
) -> dict[str, GraphSpec]:
    """Both graphs the step backend needs, written into `out_dir`, as `manifest.graphs` entries
    `step` and `step_eval`: `templates` (`step_templates`, made here when None) filled with the
    task module's weights."""
    if templates is None:
        templates = step_templates(
            task_module,
            trainable,
            example_inputs,
            input_names,
            eval_outputs,
            adamw=adamw,
            cache=cache,
            cache_key=cache_key,
        )
    out_dir = Path(out_dir)
    weights = list(_frozen_tensors(task_module, trainable).values())
    inputs, outputs = step_io(input_names, trainable)
    with shared_file(out_dir, weights_file) as shared:  # one index, each weight hashed once
        write_graph(templates[0], weights, out_dir, STEP_FILE, shared)
        write_graph(templates[1], weights, out_dir, STEP_EVAL_FILE, shared)
    return {
        "step": GraphSpec(file=STEP_FILE, inputs=inputs, outputs=outputs),
        "step_eval": GraphSpec(
            file=STEP_EVAL_FILE, inputs=(*input_names, *trainable), outputs=tuple(eval_outputs)
        ),
    }
