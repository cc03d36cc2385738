"""The step traced with a static batch, then given its dynamic batch axis back.

Why: a make_fx trace whose batch axis is a symbol does sympy arithmetic for every size, stride and
contiguity check of every tensor the batch reaches; on fedclip-tiny's step that was ~60% of the
trace (1.7-2.1 s symbolic against 0.7-0.9 s static, the same 2,050 aten ops).

How: trace with the batch a prime `B` larger than every other size of the inputs and weights.
A product of those sizes is then never a multiple of `B`, so an integer argument that is a
nonzero multiple `k * B` can only have come from the batch: it becomes `k * sym_size(data, 0)`
in the graph (what the symbolic trace records for the same argument), and a value dimension
`k * B` of the translated ONNX graph becomes the dimension `batch` or `k*batch`.

A batch-derived number the substitution cannot express (a float such as 1/B from a mean over
the batch, a B x B size, a tensor constant holding B) makes `dynamic_batch` refuse the graph:
the caller traces symbolically instead (`step_fx.fake_inputs`), exact and slower.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.utils._pytree as pytree

# Ints at or above this are sentinels (a slice to the end is 2**63 - 1), never sizes.
_SENTINEL = 1 << 62
# A float is taken for k * B (or its inverse) only for k up to this: a size's multiple of the batch
# (ViT-B-32's largest is 50 tokens x 3,072), not any huge or tiny constant (1e-12 is 1e12 / B).
_MAX_MULTIPLE = 1 << 24


class BatchNotSubstituted(Exception):
    """The static trace holds a batch-derived number that is not a multiple of the batch."""


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, math.isqrt(n) + 1))


def trace_batch_size(tensors: Sequence[torch.Tensor]) -> int:
    """The smallest prime above every size of `tensors` (and at least 1009)."""
    n = max([1008, *(d for t in tensors for d in t.shape)]) + 1
    while not _is_prime(n):
        n += 1
    return n


def static_inputs(
    frozen: Sequence[torch.Tensor], args: Sequence[torch.Tensor], n_data: int, batch: int
) -> list[torch.Tensor]:
    """Fake tensors for `(*frozen, *args)`, every size static, dim 0 of the first `n_data` args `batch`."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    out: list[torch.Tensor] = [mode.from_tensor(t) for t in frozen]
    for i, a in enumerate(args):
        if i >= n_data:
            out.append(mode.from_tensor(a))
            continue
        with mode:
            out.append(torch.empty((batch, *a.shape[1:]), dtype=a.dtype).requires_grad_(a.requires_grad))
    return out


def _batch_multiple(v, batch: int) -> int | None:
    """k when the python number `v` is `k * batch` (k >= 1); raises where `v` is batch-derived in a
    way a multiple cannot say; None for every other number."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float):
        if not math.isfinite(v) or v == 0:
            return None
        for x in (abs(v), 1 / abs(v)):  # k*B or 1/(k*B) as a float: a mean over the batch, a scale
            k = round(x / batch)
            if 1 <= k <= _MAX_MULTIPLE and abs(x - k * batch) <= 1e-9 * x:
                raise BatchNotSubstituted(f"float {v!r} is batch-derived")
        return None
    if v == 0 or abs(v) >= _SENTINEL or v % batch:
        return None
    k = v // batch
    if k < 0 or k % batch == 0:  # -B, B * B: not an affine size of the batch
        raise BatchNotSubstituted(f"int {v} is not k * batch with k >= 1")
    return k


def dynamic_batch(gm: torch.fx.GraphModule, data: torch.fx.Node | None, batch: int) -> None:
    """Replace every argument `k * batch` of `gm`'s ops by `k * sym_size(data, 0)`, in place.

    `data`: the placeholder whose dim 0 is the batch (None: the first placeholder after the frozen
    weights is not known, so nothing may be batch-derived). Raises BatchNotSubstituted when a
    number or a tensor constant is batch-derived in a way no multiple of the batch can express.
    """
    graph = gm.graph
    sizes: dict[int, torch.fx.Node] = {}
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def size_node(k: int) -> torch.fx.Node:
        if data is None:
            raise BatchNotSubstituted("a size is batch-derived but the graph has no batch input")
        if 1 not in sizes:
            with graph.inserting_after(last):
                sizes[1] = graph.call_function(torch.ops.aten.sym_size.int, (data, 0))
            sizes[1].meta["val"] = batch
        if k not in sizes:
            with graph.inserting_after(sizes[1]):  # each multiple reads only the size
                sizes[k] = graph.call_function(operator.mul, (sizes[1], k))
            sizes[k].meta["val"] = k * batch
        return sizes[k]

    def substitute(v):
        k = _batch_multiple(v, batch)
        return v if k is None else size_node(k)

    for node in list(graph.nodes):
        if node.op == "get_attr":
            _check_constant(getattr(gm, str(node.target)), batch)
        if node.op != "call_function" or node in sizes.values():
            continue
        node.args = pytree.tree_map(substitute, node.args)
        node.kwargs = pytree.tree_map(substitute, node.kwargs)
    gm.recompile()


def _refuse_batch_values(values, where: str, batch: int) -> None:
    """Raise BatchNotSubstituted when a value of a tensor constant is batch-derived: a constant holds
    the number itself, so even a plain multiple of the batch is the static size baked in."""
    for v in values:
        if _batch_multiple(v, batch) is not None:
            raise BatchNotSubstituted(f"{where} holds {v}")


def _check_constant(value, batch: int) -> None:
    if not isinstance(value, torch.Tensor) or value.numel() > 4096:
        return  # a large constant is a weight-like table, not a size
    _refuse_batch_values(value.detach().flatten().tolist(), "a tensor constant of the traced graph", batch)


def batch_dims(model, batch: int) -> None:
    """Every value dimension `k * batch` of the ONNX IR `model` named `batch` (k = 1) or `k*batch`,
    as the symbolic export names them."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter import _ir_passes

    for value in _ir_passes._all_values(model):
        if value.shape is None:
            continue
        dims = list(value.shape)
        named = [_dim_name(d, batch) for d in dims]
        if named != dims:
            value.shape = ir.Shape(named)


def _dim_name(d, batch: int):
    if not isinstance(d, int) or d == 0 or d % batch:
        return d
    return "batch" if d == batch else f"{d // batch}*batch"


def check_constants(model, batch: int) -> None:
    """Raise BatchNotSubstituted when a small constant of the ONNX IR `model` (an initializer or a
    Constant node's value) holds a batch-derived number: the translation fixed a size from a
    static shape."""
    from fedclip.exporters.graph_template import FROZEN

    tensors = [
        v.const_value
        for v in model.graph.initializers.values()
        if v.const_value is not None and not FROZEN.match(v.name or "")  # weights are not sizes
    ]
    for node in model.graph:
        if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
            tensors.append(node.attributes["value"].value)
    for t in tensors:
        if t is None or math.prod(t.shape.numpy()) > 4096:
            continue
        _refuse_batch_values(t.numpy().flatten().tolist(), "a constant of the translated graph", batch)
