"""TorchScript ONNX export that keeps parameter names, and ONNX Runtime training artifacts.

Why these settings: the dynamo exporter and constant folding rename or fold parameters away, and
outside TrainingMode.TRAINING the exporter merges initializers with equal values (every zero-init
LoRA B would collapse into one tensor). ORT's gradient builder needs the optional outputs of
LayerNormalization and SoftmaxCrossEntropyLoss to exist, so they are named before generate_artifacts.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import onnx
import torch

from fedclip.sdk.errors import ExportError

OPSET = 17


def export_onnx(
    module: torch.nn.Module,
    args: tuple[torch.Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
) -> onnx.ModelProto:
    """Export with a dynamic batch axis on every input and output."""
    dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names) if name != "loss"}
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            buf,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects too
            dynamo=False,
            export_params=True,
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.TRAINING,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
        )
    model = onnx.load_from_string(buf.getvalue())
    _name_optional_outputs(model)
    return model


def _name_optional_outputs(model: onnx.ModelProto) -> None:
    wanted = {"LayerNormalization": ("mean", "inv_std_dev"), "SoftmaxCrossEntropyLoss": ("log_prob",)}
    for i, node in enumerate(model.graph.node):
        extra = wanted.get(node.op_type)
        if not extra:
            continue
        base = node.name or f"{node.op_type}_{i}"
        while len(node.output) < 1 + len(extra):
            node.output.append(f"{base}_{extra[len(node.output) - 1]}")


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """ORT's gradient builder logs every graph pass at INFO from C++, past Python's logging.

    fd 2 goes to a temp file for the duration; on failure its tail is replayed so errors stay visible.
    """
    if os.environ.get("FEDCLIP_EXPORT_VERBOSE"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if not ok:
                sink.seek(0)
                tail = sink.read()[-4000:].decode(errors="replace")
                lines = [ln for ln in tail.splitlines() if "[I:onnxruntime" not in ln]
                if lines:
                    print("\n".join(lines[-20:]), file=sys.stderr)


def initializer_names(model: onnx.ModelProto) -> list[str]:
    return [init.name for init in model.graph.initializer]


def check_initializers(model: onnx.ModelProto, names: Sequence[str], what: str) -> None:
    have = set(initializer_names(model))
    missing = [n for n in names if n not in have]
    if missing:
        raise ExportError(f"{what}: adapter tensor {missing[0]} is not a graph initializer (folded away?)")


def make_overridable(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """List the adapter initializers as graph inputs too (ONNX "overridable initializers").

    ORT constant-folds plain initializers at session creation, and measured on 1.19.2 a value given
    with `SessionOptions.add_initializer` is then silently ignored. Initializers that are also graph
    inputs are never folded, so add_initializer (or a feed of the same name) replaces them; ORT
    still keeps them out of `get_inputs()`. It warns once per tensor at WARNING level.
    """
    check_initializers(model, names, "inference graph")
    wanted = set(names)
    listed = {i.name for i in model.graph.input}
    for init in model.graph.initializer:
        if init.name in wanted and init.name not in listed:
            model.graph.input.append(
                onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims))
            )


def save(model: onnx.ModelProto, path: Path) -> None:
    onnx.save(model, str(path))


def generate_training_artifacts(
    model: onnx.ModelProto, requires_grad: Sequence[str], out_dir: Path, keep_outputs: Sequence[str]
) -> None:
    """training/eval/optimizer (AdamW) models + checkpoint in `out_dir`.

    The first graph output must be the loss. The training model keeps only `keep_outputs` (the
    eval model keeps every output), so a train step returns just the loss.
    """
    import onnxruntime
    from onnxruntime.training import artifacts

    onnxruntime.set_default_logger_severity(3)  # its graph transformers log every pass at INFO
    check_initializers(model, requires_grad, "training graph")
    trainable = set(requires_grad)
    frozen = [
        init.name
        for init in model.graph.initializer
        if init.name not in trainable and init.data_type == onnx.TensorProto.FLOAT
    ]
    with _quiet_native_stderr():
        artifacts.generate_artifacts(
            model,
            requires_grad=list(requires_grad),
            frozen_params=frozen,
            loss=None,
            optimizer=artifacts.OptimType.AdamW,
            artifact_directory=str(out_dir),
        )
    path = out_dir / "training_model.onnx"
    train = onnx.load(str(path))
    user_outputs = [o.name for o in model.graph.output]
    drop = [o for o in train.graph.output if o.name in user_outputs and o.name not in keep_outputs]
    for o in drop:
        train.graph.output.remove(o)
    onnx.save(train, str(path))
    for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
        _canonical_node_names(out_dir / name)


_BLOCK_NAME = re.compile(r"^(onnx::.+::)\d+$")


def _canonical_node_names(path: Path) -> None:
    """onnxblock names nodes and tensors from a process-wide counter (`onnx::AdamWOptimizer::4`),
    so the same export gives other bytes the second time in a process; renumber them in order of
    first appearance instead (graph edges are by name, so renaming consistently is safe)."""
    model = onnx.load(str(path))
    g = model.graph
    mapping: dict[str, str] = {}

    def canon(name: str) -> str:
        m = _BLOCK_NAME.match(name)
        if not m:
            return name
        if name not in mapping:
            mapping[name] = f"{m.group(1)}{len(mapping)}"
        return mapping[name]

    for vi in (*g.input, *g.initializer):
        vi.name = canon(vi.name)
    for node in g.node:
        node.name = canon(node.name)
        for seq in (node.input, node.output):
            for j, name in enumerate(seq):
                seq[j] = canon(name)
    for vi in (*g.output, *g.value_info):
        vi.name = canon(vi.name)
    if mapping:
        onnx.save(model, str(path))
