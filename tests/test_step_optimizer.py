"""The step export's two shortcuts around onnxscript and the ONNX exporter change nothing they touch:
rewrite rules tried only on nodes of their root op type rewrite a graph exactly as the full rule set
does, and memoized op signatures equal freshly derived ones (small hand-built graphs); and tracing
does not flood stderr with the exporter's per-node warnings (a one-matmul function)."""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnx import TensorProto, helper
from onnxscript import rewriter

from fedclip.exporters.step_trace import _SKIP_RULES, _op_signatures_memoized, _Rooted, _rooted


def _graph() -> onnx.ModelProto:
    """Patterns several default rules rewrite (Reshape of a Reshape, Transpose of a Transpose,
    x * 1, x + 0, Cast to the same type, a 1-d Squeeze of a Reshape) between ops no rule matches."""
    c = helper.make_tensor
    inits = [
        c("one", TensorProto.FLOAT, [], [1.0]),
        c("zero", TensorProto.FLOAT, [], [0.0]),
        c("s1", TensorProto.INT64, [2], [6, 4]),
        c("s2", TensorProto.INT64, [2], [4, 6]),
        c("flat", TensorProto.INT64, [1], [24]),
        c("axes", TensorProto.INT64, [1], [0]),
    ]
    n = helper.make_node
    nodes = [
        n("Relu", ["x"], ["r"]),
        n("Reshape", ["r", "s1"], ["a"]),
        n("Reshape", ["a", "s2"], ["b"]),
        n("Transpose", ["b"], ["t1"], perm=[1, 0]),
        n("Transpose", ["t1"], ["t2"], perm=[1, 0]),
        n("Mul", ["t2", "one"], ["m"]),
        n("Add", ["m", "zero"], ["p"]),
        n("Cast", ["p"], ["q"], to=TensorProto.FLOAT),
        n("Sigmoid", ["q"], ["g"]),
        n("Reshape", ["g", "flat"], ["f"]),
        n("Unsqueeze", ["f", "axes"], ["u"]),
        n("Squeeze", ["u", "axes"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [24])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _rewritten(rules) -> tuple[bytes, int]:
    model = ir.serde.deserialize_model(_graph())
    rewriter.RewritePass(rules)(model)
    proto = ir.serde.serialize_model(model)
    return proto.SerializeToString(deterministic=True), len(proto.graph.node)


def test_rooted_rules_rewrite_a_graph_exactly_as_the_full_rule_set():
    plain = [r for r in rewriter._DEFAULT_REWRITE_RULES if getattr(r, "name", None) not in _SKIP_RULES]
    rooted = [_rooted(r) for r in plain]
    assert sum(isinstance(r, _Rooted) for r in rooted) >= len(plain) - 2  # nearly all have a fixed root
    want, want_nodes = _rewritten(plain)
    got, got_nodes = _rewritten(rooted)
    assert want_nodes < len(_graph().graph.node)  # the rules did fire: the comparison means something
    assert got_nodes == want_nodes
    assert got == want


def test_a_rooted_rule_is_not_tried_on_other_op_types():
    calls = []

    class Rule:
        name = "probe"

        def try_rewrite(self, model, graph, node, **kwargs):
            calls.append(node.op_type)

    rule = _Rooted(Rule(), "Reshape")
    for op in ("Relu", "Reshape", "Transpose"):
        assert rule.try_rewrite(None, None, ir.Node("", op, inputs=[])) is None
    assert calls == ["Reshape"]
    assert rule.name == "probe"  # everything else is the wrapped rule's


def test_memoized_op_signatures_equal_fresh_ones_and_are_restored_after():
    derive = ir.schemas.OpSignature.from_op_schema
    schemas = [onnx.defs.get_schema(op, 18) for op in ("Add", "Reshape", "Conv", "Cast")]
    with _op_signatures_memoized():
        first = [ir.schemas.OpSignature.from_op_schema(s) for s in schemas]
        again = [ir.schemas.OpSignature.from_op_schema(onnx.defs.get_schema(s.name, 18)) for s in schemas]
    assert all(a is b for a, b in zip(first, again, strict=True))  # one per schema
    assert first == [derive(s) for s in schemas]  # and what the exporter would have derived
    assert ir.schemas.OpSignature.from_op_schema == derive


def test_tracing_writes_no_warning_per_node_to_stderr(capfd):
    """The exporter warns for every node of a hand-built program (no nn_module_stack); a user's
    `fedclip-coord export` printed ~2,600 such lines for fedclip-tiny before they were silenced."""
    import torch

    from fedclip.exporters.step_trace import trace

    def fn(w, x):
        return ((x @ w).relu().sum(),)

    model = trace(fn, [torch.randn(4, 3)], [torch.randn(2, 4)], 1, ["x"], ["y"], "small.onnx")
    assert [o.name for o in model.graph.output] == ["y"] and len(model.graph.node) > 0
    err = capfd.readouterr().err
    assert "nn_module_stack" not in err, err[:300]
