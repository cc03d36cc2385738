"""The training step as one functional FX graph of ONNX-translatable aten ops, traced once.

make_fx traces forward and `autograd.grad` on fake tensors (a static batch made dynamic afterwards,
`step_batch`; or, where that cannot be done, a symbolic batch axis: `fake_inputs`), decomposing as
it goes into the ops torchlib translates. The graph is then wrapped as an ExportedProgram by hand
(frozen weights as buffers `frozen_<i>`) so the dynamo ONNX exporter's translation takes it as is.

Why not make_fx -> torch.export -> torch.onnx.export: that traces the same graph three times
(make_fx, torch.export's re-trace, the exporter's `run_decompositions`), and make_fx's
`tracing_mode="symbolic"` makes every size of every weight a sympy symbol; each trace was ~10x
the whole ORT-artifact export. One fake-mode trace is under a second on fedclip-tiny.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch

from fedclip.exporters.graph_template import frozen_name


def fake_inputs(
    frozen: Sequence[torch.Tensor], args: Sequence[torch.Tensor], n_data: int
) -> tuple[list[torch.Tensor], set[str]]:
    """Fake tensors for `(*frozen, *args)`: dim 0 of the first `n_data` args symbolic, all else static;
    and the batch symbols' names (the ONNX graph's dims to rename `batch`)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())

    def fake(t: torch.Tensor, batch: bool) -> torch.Tensor:
        dims = [DimDynamic.DYNAMIC if batch and d == 0 else DimDynamic.STATIC for d in range(t.dim())]
        return mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))

    out = [fake(t, False) for t in frozen] + [fake(a, i < n_data) for i, a in enumerate(args)]
    names = {str(out[len(frozen) + i].shape[0]) for i in range(n_data)}
    return out, names


def _is_mutation(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _fresh(node: torch.fx.Node) -> bool:
    """`node` is an op result that aliases nothing (not an input, not a view)."""
    schema = getattr(node.target, "_schema", None)
    return (
        node.op == "call_function"
        and schema is not None
        and all(r.alias_info is None for r in schema.returns)
    )


def _drop_dead_copies(gm: torch.fx.GraphModule) -> bool:
    """Replace `copy_(dst, src)` by `src` where that is exact: dst is a fresh tensor, src has its
    shape and dtype, and dst's other readers all come before the copy and alias nothing, so none
    can see the write (norm's backward writes `masked_fill(dst, ...)` back into dst this way).
    True when no mutation is left."""
    graph = gm.graph
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        if node.target is not torch.ops.aten.copy_.default or len(node.args) != 2:
            continue
        dst, src = node.args
        if not (isinstance(dst, torch.fx.Node) and isinstance(src, torch.fx.Node)):
            continue
        dv, sv = dst.meta.get("val"), src.meta.get("val")
        if dv is None or sv is None or dv.dtype != sv.dtype or str(dv.shape) != str(sv.shape):
            continue
        readers = [u for u in dst.users if u is not node]
        if _fresh(dst) and all(order[u] < order[node] and _fresh(u) for u in readers):
            node.replace_all_uses_with(src)
            graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return not any(_is_mutation(n) for n in graph.nodes)


def functional(gm: torch.fx.GraphModule, fake: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """`gm` without in-place ops: the common exact cases rewritten, else re-traced functionalized."""
    if _drop_dead_copies(gm):
        return gm
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(torch.func.functionalize(gm, remove="mutations"), tracing_mode="fake")(*fake)


def _insert_type_promotion(gm: torch.fx.GraphModule) -> None:
    """The exporter's type promotion pass (explicit casts where an aten op would promote), reusing
    make_fx's fake values for the nodes it leaves alone.

    The exporter's pass re-runs every node on fake tensors to know its inputs' dtypes; make_fx
    recorded each node's fake value already (`meta["val"]`) and a promotion never changes a node's
    output dtype or shape, so only the nodes it rewrites (and the casts it adds) are run again.
    That re-run was a third of the step export's tracing time.
    """
    from torch.onnx._internal.fx.passes import type_promotion as tp

    class Reusing(tp._TypePromotionInterpreter):
        def run_node(self, n: torch.fx.Node):
            before = (n.target, n.args, n.kwargs)
            with self._set_current_node(n):
                if rule := tp.get_type_promotion_rule(n, self.type_promotion_table):
                    self._maybe_promote_node(n, rule)
            if n.op == "call_function" and "val" in n.meta and (n.target, n.args, n.kwargs) == before:
                return n.meta["val"]
            return torch.fx.Interpreter.run_node(self, n)

    promotion = tp.InsertTypePromotion(gm)
    promotion.interpreter = Reusing(gm, tp.TypePromotionTable())
    promotion.run()


def as_program(gm: torch.fx.GraphModule, frozen: Sequence[torch.Tensor]) -> torch.export.ExportedProgram:
    """`gm(*frozen, *args)` as an ExportedProgram whose first `len(frozen)` inputs are the buffers
    `frozen_<i>` (the ONNX initializers `graph_template` strips and fills), the rest user inputs;
    with the exporter's own passes (explicit type promotion, no assertion nodes) applied."""
    from torch.export import graph_signature as gs
    from torch.export.exported_program import ExportedProgram
    from torch.onnx._internal.exporter import _fx_passes

    _insert_type_promotion(gm)
    gm = _fx_passes.remove_assertion_nodes(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    k = len(frozen)
    inputs = [
        gs.InputSpec(gs.InputKind.BUFFER, gs.TensorArgument(n.name), frozen_name(i), persistent=True)
        if i < k
        else gs.InputSpec(gs.InputKind.USER_INPUT, gs.TensorArgument(n.name), None)
        for i, n in enumerate(placeholders)
    ]
    # The traced step returns one flat tuple of nodes; fx types an output's args as any Argument.
    results = cast("tuple[torch.fx.Node, ...]", gm.graph.output_node().args[0])
    outputs = [gs.OutputSpec(gs.OutputKind.USER_OUTPUT, gs.TensorArgument(r.name), None) for r in results]
    return ExportedProgram(
        root=gm,
        graph=gm.graph,
        graph_signature=gs.ExportGraphSignature(input_specs=inputs, output_specs=outputs),
        state_dict={frozen_name(i): t for i, t in enumerate(frozen)},
        range_constraints={},
        module_call_graph=[],
    )
