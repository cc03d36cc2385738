"""The step graph's FX stage: in-place ops are removed exactly (dropped where no reader can see them,
else by a functionalizing re-trace), and only the batch axis is symbolic. No model export: small
functions traced the way `step_trace` traces a step."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from fedclip.exporters.step_fx import _is_mutation, fake_inputs, functional
from fedclip.exporters.step_registry import decompositions


def _traced(fn, frozen, args, n_data=1):
    decomp = decompositions()
    fake, batch = fake_inputs(frozen, args, n_data)
    gm = make_fx(fn, tracing_mode="fake", decomposition_table=decomp)(*fake)
    return functional(gm, fake), batch


def _mutations(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if _is_mutation(n)]


def _scratch_write(w, x):
    y = x @ w
    z = y.masked_fill(y < 0, 0.0)
    y.copy_(z)  # a write nothing reads afterwards but through the copy's result
    return (y * 2).sum(dim=1)


def _view_write(w, x):
    y = x @ w
    y[:, 0].add_(1.0)  # through a view: the write is seen by y, so it cannot just be dropped
    return y.sum(dim=1), y


def test_a_scratch_copy_is_dropped_and_the_values_stay():
    w, x = torch.randn(4, 3), torch.randn(6, 4)
    gm, _ = _traced(_scratch_write, [w], [x])
    assert _mutations(gm) == []
    assert "copy" not in str(gm.graph)  # dropped, not re-traced into a functional copy
    other = torch.randn(9, 4)  # another batch size: the batch axis is symbolic
    torch.testing.assert_close(gm(w, other), _scratch_write(w, other.clone()))


def test_a_write_through_a_view_is_functionalized():
    w, x = torch.randn(4, 3), torch.randn(6, 4)
    gm, batch = _traced(_view_write, [w], [x])
    assert _mutations(gm) == []
    assert len(batch) == 1
    other = torch.randn(2, 4)
    got = gm(w, other)
    want = _view_write(w, other.clone())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_only_the_batch_axis_is_symbolic():
    fake, batch = fake_inputs([torch.zeros(4, 3)], [torch.zeros(6, 4), torch.zeros(6)], n_data=2)
    w, x, y = fake
    assert all(isinstance(d, int) for d in (*w.shape, x.shape[1]))
    assert isinstance(x.shape[0], torch.SymInt) and isinstance(y.shape[0], torch.SymInt)
    assert batch == {str(x.shape[0]), str(y.shape[0])}
