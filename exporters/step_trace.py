"""A traced function -> one ONNX graph: make_fx, torch.export (dynamic batch), the dynamo ONNX exporter
and onnxscript's optimizer, each a phase of the export profile.

The frozen weights are the function's leading inputs while tracing and buffers `frozen_<i>` after,
so the graph's weights are the initializers `graph_template` strips and fills.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Sequence

import onnx
import torch
from torch import nn

from fedclip.exporters.graph_template import FROZEN, frozen_name
from fedclip.exporters.phases import phase
from fedclip.sdk.errors import ExportError

OPSET = 18
# IR 8 is the oldest IR that carries opset 18; older ONNX Runtime builds (JetPack's) refuse IR 10.
IR_VERSION = 8


class _Traced(nn.Module):
    """The make_fx graph as an ordinary module: frozen weights as buffers, the rest positional inputs.

    The frozen weights were graph inputs while tracing: closed-over tensors would be constant-folded
    by make_fx, which stores e.g. every transposed linear weight as a second copy.
    """

    def __init__(self, gm: torch.fx.GraphModule, frozen: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.gm = gm
        self.n_frozen = len(frozen)
        for i, t in enumerate(frozen):
            self.register_buffer(frozen_name(i), t)

    def forward(self, *args):
        frozen = [getattr(self, frozen_name(i)) for i in range(self.n_frozen)]
        return self.gm(*frozen, *args)


def trace(fn, frozen, args, n_data: int, input_names, output_names, file: str) -> onnx.ModelProto:
    """`fn(*frozen, *args)` as an ONNX graph named `file` in errors; dim 0 of the first `n_data` args
    is the dynamic batch."""
    try:
        return _trace_unchecked(fn, frozen, args, n_data, input_names, output_names, file)
    except ExportError:
        raise
    except Exception as e:  # torch's tracers and exporters raise many classes
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise ExportError(f"{file}: cannot export the training step: {type(e).__name__}: {first}") from e


def _optimize(onnx_program) -> None:
    """onnxscript's graph optimizer with the frozen weights held as graph inputs meanwhile.

    It folds no node that reads a graph input, so no initializer is computed from a weight: the
    graph stays a template that other weights can fill in (`graph_template`), and no weight is
    stored twice (it would fold a Transpose of a linear weight into W^T next to the inference
    graph's W in the shared weights file).
    """
    graph = onnx_program.model.graph
    weights = [v for name, v in graph.initializers.items() if FROZEN.match(name)]
    graph.inputs.extend(weights)
    # onnx_ir logs a WARNING per weight it may not deduplicate because it is a graph input.
    dedup_log = logging.getLogger("onnx_ir.passes.common.initializer_deduplication")
    saved_level = dedup_log.level
    dedup_log.setLevel(logging.ERROR)
    try:
        onnx_program.optimize()
    finally:
        dedup_log.setLevel(saved_level)
        for v in weights:
            graph.inputs.remove(v)
    for v in weights:  # weights the optimized graph no longer reads
        if not v.uses() and not v.is_graph_output():
            graph.initializers.pop(v.name, None)


def _trace_unchecked(
    fn,
    frozen: list[torch.Tensor],
    args: list[torch.Tensor],
    n_data: int,
    input_names,
    output_names,
    file: str,
) -> onnx.ModelProto:
    from torch._decomp import get_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    # Typed `dict`: torch types its keys OperatorBase, make_fx asks for OpOverload (the same objects).
    decomp: dict = get_decompositions([torch.ops.aten.nll_loss_forward, torch.ops.aten.nll_loss_backward])
    # torch.onnx prints its progress to stdout, which would tear the export's progress bar.
    with torch.enable_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        with phase(f"{file}: tracing (make_fx)"):
            gm = make_fx(
                fn, tracing_mode="symbolic", decomposition_table=decomp, _allow_non_fake_inputs=True
            )(*frozen, *args)
        with phase(f"{file}: torch.export"):
            batch = torch.export.Dim("batch", min=1, max=1 << 16)
            dyn = tuple({0: batch} if i < n_data else None for i in range(len(args)))
            plain = tuple(a.detach() for a in args)
            program = torch.export.export(_Traced(gm, frozen), plain, dynamic_shapes=(dyn,), strict=False)
        with phase(f"{file}: ONNX translation"):
            onnx_program = torch.onnx.export(
                program,
                (),
                input_names=list(input_names),
                output_names=list(output_names),
                dynamo=True,
                opset_version=OPSET,
                optimize=False,
                verbose=False,
            )
        with phase(f"{file}: onnxscript optimizer"):
            _optimize(onnx_program)
    model = onnx_program.model_proto  # type: ignore[union-attr]  # dynamo=True always returns a program
    got_in = [i.name for i in model.graph.input]
    got_out = [o.name for o in model.graph.output]
    if got_in != list(input_names) or got_out != list(output_names):
        raise ExportError(f"{file}: exported graph io {got_in[:3]}... differs from the requested names")
    model.ir_version = IR_VERSION
    _drop_debug_info(model)
    return model


def _drop_debug_info(model: onnx.ModelProto) -> None:
    """The exporter's per-node debug notes (stack traces, FX node text) are most of the file, and name
    the checkout's path and a per-process counter, so the same export would give other bytes."""
    g = model.graph
    for item in (*g.node, *g.input, *g.output, *g.value_info, *g.initializer):
        del item.metadata_props[:]
