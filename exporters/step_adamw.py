"""AdamW written straight into the step graph as ONNX nodes, after the traced forward and backward.

Why not trace it with the rest: its ~12 ops per trainable tensor are a quarter of fedclip-tiny's
step graph (40 tensors), and each op costs the same at make_fx, translation and the optimizer as a
matmul does; here they are a few hundred protobuf nodes made in milliseconds. The arithmetic is the
traced one op for op (same ops, operands, order and float32 constants), so the graph computes the
same bits (tests/test_step_adamw.py compares against torch.optim.AdamW).

The gradient AdamW sees is `g + prox_mu * (w - w.anchor)`: the gradient of a proximal term
`(prox_mu / 2) ||w - anchor||^2` added to the loss (Ditto's personal objective, docs/aggregation.md
"Personal tuning"). It has to sit here, before the moments: a pull applied outside the optimizer is
a different (and measurably weaker) method. With `prox_mu = 0` every step is bit for bit the one
without it (`g + 0 * x` is `g` for finite `x`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedclip.sdk.errors import ExportError

# The step graph's own names (the data names `image`, `labels`, ... come from docs/internals.md).
STEP_IN, LR_IN, LOSS_OUT, STEP_OUT = "step", "lr", "loss", "step_out"
EXP_AVG, EXP_AVG_SQ, NEW, GRAD = ".exp_avg", ".exp_avg_sq", ".new", ".grad"
PROX_IN, ANCHOR = "prox_mu", ".anchor"  # the proximal term's weight and each tensor's anchor


def step_io(data_inputs: Sequence[str], trainable: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The step graph's input and output names, in graph order (the proximal inputs last, so a
    bundle exported before them reads as the same list without its tail)."""
    inputs = (
        *data_inputs,
        STEP_IN,
        LR_IN,
        *trainable,
        *(n + EXP_AVG for n in trainable),
        *(n + EXP_AVG_SQ for n in trainable),
        PROX_IN,
        *(n + ANCHOR for n in trainable),
    )
    outputs = (
        LOSS_OUT,
        STEP_OUT,
        *(n + NEW for n in trainable),
        *(n + EXP_AVG + NEW for n in trainable),
        *(n + EXP_AVG_SQ + NEW for n in trainable),
    )
    return inputs, outputs


@dataclass(frozen=True)
class AdamW:
    """AdamW fixed at export; the learning rate is a graph input.

    `mode="torch"` is torch.optim.AdamW; `mode="hf"` is the transformers variant (eps added before
    the bias correction, decay after the update) that ORT's AdamWOptimizer runs with adam_mode=1.
    The defaults are those of the optimizer in the bundle's ORT training artifacts (onnxblock's
    AdamW), so the two formats of one bundle train alike and a mixed fleet aggregates like updates.
    """

    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    weight_decay: float = 0.0
    mode: Literal["torch", "hf"] = "hf"

    def __post_init__(self) -> None:
        if self.mode not in ("torch", "hf"):
            raise ExportError(f"adamw.mode: {self.mode!r} is not 'torch' or 'hf'")


class _Builder:
    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.consts: dict[tuple[str, float], str] = {}

    def const(self, value: float, dtype=np.float32) -> str:
        """A scalar initializer holding `value` as `dtype` (python floats rounded as torch rounds a
        scalar operand of a float32 tensor op)."""
        key = (np.dtype(dtype).name, float(value))
        if key not in self.consts:
            name = f"adamw/const_{len(self.consts)}"
            self.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
            self.consts[key] = name
        return self.consts[key]

    def op(self, op_type: str, out: str, *inputs: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out


def add_adamw(model: onnx.ModelProto, n_data: int, trainable: Sequence[str], opt: AdamW) -> None:
    """In place: the traced graph (data inputs, trainable tensors) -> (loss, the tensors' gradients
    `<name>.grad`, extra outputs) becomes the step graph (data inputs, `step`, `lr`, tensors, first
    and second moments, `prox_mu`, anchors) -> (loss, `step_out`, new tensors, new moments, extra
    outputs)."""
    g = model.graph
    data, params = list(g.input[:n_data]), list(g.input[n_data:])
    if [p.name for p in params] != list(trainable):
        raise ExportError("step graph: the traced graph's inputs are not the data then the trainable tensors")
    loss, grads, extras = g.output[0], list(g.output[1 : 1 + len(params)]), list(g.output[1 + len(params) :])
    if [o.name for o in grads] != [n + GRAD for n in trainable]:
        raise ExportError("step graph: the traced graph's outputs are not the loss then the gradients")
    b = _Builder(g)
    b1, b2 = opt.betas
    step_out = b.op("Add", STEP_OUT, STEP_IN, b.const(1, np.int64))
    t = b.op("Cast", "adamw/t", step_out, to=TensorProto.FLOAT)
    bc1 = b.op("Sub", "adamw/bc1", b.const(1.0), b.op("Pow", "adamw/b1_t", b.const(b1), t))
    bc2 = b.op("Sub", "adamw/bc2", b.const(1.0), b.op("Pow", "adamw/b2_t", b.const(b2), t))
    bc2_sqrt = b.op("Sqrt", "adamw/bc2_sqrt", bc2)
    if opt.mode == "torch":  # decay = 1 - lr * wd, step_size = lr / bc1
        lr_wd = b.op("Mul", "adamw/lr_wd", LR_IN, b.const(opt.weight_decay))
        decay = b.op("Sub", "adamw/decay", b.const(1.0), lr_wd)
        step_size = b.op("Div", "adamw/step_size", LR_IN, bc1)
    else:  # decay = lr * wd, step_size = lr * bc2_sqrt / bc1
        decay = b.op("Mul", "adamw/decay", LR_IN, b.const(opt.weight_decay)) if opt.weight_decay else ""
        step_size = b.op("Div", "adamw/step_size", b.op("Mul", "adamw/lr_bc2", LR_IN, bc2_sqrt), bc1)
    for name in trainable:
        p, grad, m, v, at = name, name + GRAD, name + EXP_AVG, name + EXP_AVG_SQ, f"adamw/{name}/"
        # g = g + prox_mu * (p - anchor)
        pulled = b.op("Mul", at + "prox", PROX_IN, b.op("Sub", at + "from_anchor", p, name + ANCHOR))
        grad = b.op("Add", at + "grad_prox", grad, pulled)
        # m2 = m + (g - m) * (1 - b1);  v2 = v * b2 + g * g * (1 - b2)
        m2 = b.op("Sub", at + "g_m", grad, m)
        m2 = b.op("Add", m + NEW, m, b.op("Mul", at + "m_step", m2, b.const(1 - b1)))
        gg = b.op("Mul", at + "gg_b2", b.op("Mul", at + "gg", grad, grad), b.const(1 - b2))
        v2 = b.op("Add", v + NEW, b.op("Mul", at + "v_b2", v, b.const(b2)), gg)
        root = b.op("Sqrt", at + "sqrt_v", v2)
        if opt.mode == "torch":  # p * decay - step_size * m2 / (sqrt(v2) / bc2_sqrt + eps)
            root = b.op("Div", at + "sqrt_v_bc2", root, bc2_sqrt)
            denom = b.op("Add", at + "denom", root, b.const(opt.eps))
            p2 = b.op("Mul", at + "decayed", p, decay)
        else:  # p - step_size * m2 / (sqrt(v2) + eps), then - decay * p2
            denom = b.op("Add", at + "denom", root, b.const(opt.eps))
            p2 = p
        update = b.op("Div", at + "update", b.op("Mul", at + "scaled", step_size, m2), denom)
        new_p = p + NEW if opt.mode == "torch" or not decay else at + "updated"
        p2 = b.op("Sub", new_p, p2, update)
        if opt.mode == "hf" and decay:
            b.op("Sub", p + NEW, p2, b.op("Mul", at + "decay_p", decay, p2))
    g.node.extend(b.nodes)
    _set_io(g, data, params, loss, extras)


def _like(info: onnx.ValueInfoProto, name: str) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(info)
    out.name = name
    return out


def _set_io(g: onnx.GraphProto, data, params, loss, extras) -> None:
    """The graph's inputs and outputs: `step_io`'s names, in its order, then the extra outputs."""
    one = [1]
    infos = {v.name: v for v in (*data, *params, loss)}
    infos[STEP_IN] = helper.make_tensor_value_info(STEP_IN, TensorProto.INT64, one)
    infos[LR_IN] = helper.make_tensor_value_info(LR_IN, TensorProto.FLOAT, one)
    infos[PROX_IN] = helper.make_tensor_value_info(PROX_IN, TensorProto.FLOAT, one)
    infos[STEP_OUT] = helper.make_tensor_value_info(STEP_OUT, TensorProto.INT64, one)
    for p in params:  # moments, new tensors and new moments are typed as their tensor
        for suffix in (EXP_AVG, EXP_AVG_SQ, NEW, EXP_AVG + NEW, EXP_AVG_SQ + NEW, ANCHOR):
            infos[p.name + suffix] = p
    names_in, names_out = step_io([d.name for d in data], [p.name for p in params])
    inputs = [_like(infos[n], n) for n in names_in]
    outputs = [_like(infos[n], n) for n in names_out] + [_like(v, v.name) for v in extras]
    del g.input[:], g.output[:]
    g.input.extend(inputs)
    g.output.extend(outputs)
