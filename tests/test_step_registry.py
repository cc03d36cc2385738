"""The step export's torchlib tables (`step_registry`) equal what `ONNXRegistry.from_torchlib` gives:
the same set of ops left undecomposed, and for a traced step (layer norm, GELU, softmax, a loss and
its gradients) the same ONNX graph, byte for byte, from the registry of the graph's own ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedclip.exporters import step_registry, step_trace


def _step(w1, w2, x, y):
    h = F.gelu(F.layer_norm(x @ w1, (w1.shape[1],)))
    logits = torch.softmax(h @ w2, dim=-1).log()
    loss = F.nll_loss(logits, y)
    return (loss, *torch.autograd.grad(loss, (w1,)))


def _export() -> bytes:
    torch.manual_seed(0)
    w1, w2 = torch.randn(4, 8), torch.randn(8, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    frozen = [w2.clone()]

    def fn(w2_frozen, x, y, w1):
        return _step(w1, w2_frozen, x, y)

    model = step_trace.trace(
        fn, frozen, [x, y, w1.requires_grad_(True)], 2, ["x", "y", "w1"], ["loss", "g1"], "t.onnx"
    )
    return model.SerializeToString(deterministic=True)


def _full_registry(_gm):
    from torch.onnx._internal.exporter import _registration

    return _registration.ONNXRegistry.from_torchlib(opset_version=step_registry.OPSET)


def test_the_ops_left_undecomposed_are_from_torchlibs():
    from torch.onnx._internal.exporter import _decomp

    full = _decomp.get_onnx_implemented_overloads(_full_registry(None))
    assert {step_registry._key(t) for t in step_registry.implemented()} == {
        step_registry._key(t) for t in full
    }


def test_the_graphs_registry_translates_as_the_full_one(monkeypatch):
    ours = _export()
    monkeypatch.setattr(step_trace, "registry_for", _full_registry)
    assert _export() == ours
