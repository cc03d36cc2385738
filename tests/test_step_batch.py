"""The static-batch trace (`step_batch`): every number the batch reaches becomes a multiple of the
graph's own batch size, graphs run at any batch like eager torch, and a batch-derived number no
multiple can express sends the export to the exact symbolic trace instead. Small functions traced
the way `step_trace` traces a step; one exported to ONNX and run in ONNX Runtime at two batches."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fedclip.exporters import step_batch as sb
from fedclip.exporters.step_fx import functional
from fedclip.exporters.step_registry import decompositions
from fedclip.exporters.step_trace import trace


def _static(fn, frozen, args, n_data=1):
    batch = sb.trace_batch_size([*frozen, *args])
    fake = sb.static_inputs(frozen, args, n_data, batch)
    gm = functional(make_fx(fn, tracing_mode="fake", decomposition_table=decompositions())(*fake), fake)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sb.dynamic_batch(gm, placeholders[len(frozen)], batch)
    return gm, batch


def _heads(w, x):
    """Sizes that are multiples of the batch: a view to (batch * heads, ...), an expand, new_zeros."""
    h = (x @ w).view(x.shape[0] * 2, -1, 2)  # batch * 2 rows
    z = x.new_zeros(x.shape[0], 3)
    return (h.sum(dim=(1, 2)).view(x.shape[0], 2).sum(1) + z.sum(1) + w.sum(),)


def _mean_scale(w, x):
    return ((x @ w).sum() * (1.0 / x.shape[0]),)  # 1/B as a python float: no multiple says it


def test_the_trace_batch_is_a_prime_above_every_size():
    b = sb.trace_batch_size([torch.zeros(4, 3), torch.zeros(49408, 2)])
    assert b == 49409 and all(b % d for d in range(2, int(b**0.5) + 1))
    assert sb.trace_batch_size([torch.zeros(5)]) == 1009  # never below 1009


@pytest.mark.parametrize(
    ("value", "k"),
    [
        (1009, 1),
        (3 * 1009, 3),
        (2**63 - 1, None),
        (7, None),
        (0, None),
        (True, None),
        (1e-12, None),
        (0.5, None),
    ],
)
def test_a_number_is_a_multiple_of_the_batch_only_when_it_is_one(value, k):
    assert sb._batch_multiple(value, 1009) == k


@pytest.mark.parametrize("value", [1009 * 1009, -1009, 1.0 / 1009, 2018.0, 1.0 / (5 * 1009)])
def test_a_batch_derived_number_no_multiple_expresses_is_refused(value):
    with pytest.raises(sb.BatchNotSubstituted):
        sb._batch_multiple(value, 1009)


def test_views_expands_and_new_tensors_follow_the_batch():
    w, x = torch.randn(4, 4), torch.randn(6, 4)
    gm, batch = _static(_heads, [w], [x])
    sizes = [n for n in gm.graph.nodes if n.target is torch.ops.aten.sym_size.int]
    assert len(sizes) == 1  # one read of the batch, its multiples computed from it
    leftover = [a for n in gm.graph.nodes for a in n.args if isinstance(a, int) and a and a % batch == 0]
    assert leftover == []
    for n in (1, 3, 9):
        other = torch.randn(n, 4)
        torch.testing.assert_close(gm(w, other), _heads(w, other))


def test_a_float_of_the_batch_is_refused_at_the_graph():
    with pytest.raises(sb.BatchNotSubstituted, match="float"):
        _static(_mean_scale, [torch.randn(4, 3)], [torch.randn(6, 4)])


@pytest.mark.parametrize("value", [1009.0, 2018], ids=["float", "int-multiple"])
def test_a_tensor_constant_holding_the_batch_is_refused(value):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c = torch.tensor([value])  # the batch baked into a constant: a get_attr node

        def forward(self, x):
            return x.sum() / self.c

    gm = torch.fx.symbolic_trace(Scaled())
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    with pytest.raises(sb.BatchNotSubstituted):
        sb.dynamic_batch(gm, placeholder, 1009)


def test_an_onnx_constant_holding_the_batch_is_refused():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["shape"], value=helper.make_tensor("v", TensorProto.INT64, [2], [2018, 4])
            )
        ],
        "g",
        [],
        [helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph))
    with pytest.raises(sb.BatchNotSubstituted):
        sb.check_constants(model, 1009)
    sb.check_constants(model, 1013)  # another batch: nothing batch-derived


def _run(model: onnx.ModelProto, w: np.ndarray, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x}
    if "frozen_0" in {i.name for i in sess.get_inputs()}:
        feeds["frozen_0"] = w
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("fn", [_heads, _mean_scale], ids=["static", "falls-back-to-symbolic"])
def test_the_exported_graph_is_right_at_any_batch(fn, caplog):
    w, x = torch.randn(4, 4), torch.randn(6, 4)
    with caplog.at_level(logging.INFO, logger="fedclip.exporters.step_trace"):
        model = trace(fn, [w], [x], 1, ["x"], ["y"], "test.onnx")
    symbolic = "traced symbolically" in caplog.text
    assert symbolic == (fn is _mean_scale)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 4]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    assert any(k.startswith("frozen_") for k in weights)
    for n in (1, 5, 11):
        other = torch.randn(n, 4)
        want = fn(w, other)[0].numpy()
        np.testing.assert_allclose(_run(model, w.numpy(), other.numpy()), want, rtol=1e-5, atol=1e-5)


def test_the_collector_sees_everything_again_after_a_trace():
    import gc

    w, x = torch.randn(4, 4), torch.randn(6, 4)
    trace(_heads, [w], [x], 1, ["x"], ["y"], "test.onnx")
    assert gc.get_freeze_count() == 0
    with pytest.raises(Exception):  # noqa: B017  (whatever the failure, the collector is handed back)
        trace(_heads, [w], [x], 1, ["x"], ["y", "extra"], "test.onnx")
    assert gc.get_freeze_count() == 0
