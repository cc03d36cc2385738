"""The torchlib tables the step export needs, built for the ops a graph uses only.

`ONNXRegistry.from_torchlib` derives an ONNX signature for each of torchlib's ~500 functions (from
each function's parsed source): ~0.4 s per process, for a step graph that uses ~45 of them. Here
the decomposition table is built from the names torchlib registers (no signature needed), and
the registry a translation reads holds only the graph's own ops; what `from_torchlib` would
register for those ops, in the same order (tests/test_step_registry.py compares the two).
"""

from __future__ import annotations

import functools

import torch

OPSET = 18


def _key(target) -> object:
    # The registry keys an OpOverload by its qualified name (OpOverload hashing is unreliable there).
    return target.name() if isinstance(target, torch._ops.OpOverload) else target


@functools.lru_cache(maxsize=1)
def _torchlib() -> tuple[list, dict]:
    """(torch's own torchlib metas, {key: [(target, onnxscript function, is_complex), ...]})."""
    from onnxscript.function_libs.torch_lib import ops  # noqa: F401  (registers torchlib's functions)
    from onnxscript.function_libs.torch_lib.registration import default_registry
    from torch.onnx._internal.exporter import _registration
    from torch.onnx._internal.exporter._torchlib import _torchlib_registry

    own = list(_torchlib_registry.get_torchlib_ops())
    functions: dict[object, list] = {}
    for name, overloads in default_registry.items():
        if name.startswith("internal::"):
            continue
        target = _registration._get_overload(name)
        if target is None:
            continue
        entries = functions.setdefault(_key(target), [])
        entries += [(target, f, False) for f in overloads.overloads]
        entries += [(target, f, True) for f in overloads.complex]
    return own, functions


def implemented() -> set:
    """The ops the registry translates at OPSET (what the decomposition table must leave alone)."""
    own, functions = _torchlib()
    ops = {m.fx_target for m in own if m.opset_introduced <= OPSET}
    ops |= {entries[0][0] for entries in functions.values() if entries}
    return ops


@functools.lru_cache(maxsize=1)
def decompositions() -> dict:
    """The decomposition table make_fx traces with: the exporter's ONNX-friendly one (every aten op
    torchlib cannot translate is decomposed) plus nll_loss forward/backward: onnxscript's nll_loss
    fakes its total weight, which would scale gradients by the batch size."""
    from torch._decomp import get_decompositions
    from torch.onnx._internal.exporter import _decomp

    table = _decomp.create_onnx_friendly_decomposition_table(implemented())
    # torch types get_decompositions' keys OperatorBase and the table's OpOverload (the same objects)
    nll: dict = get_decompositions([torch.ops.aten.nll_loss_forward, torch.ops.aten.nll_loss_backward])
    table.update(nll)
    return table


_metas: dict[object, list] = {}  # key -> its OnnxDecompMeta list, signatures derived once per process


def _metas_of(key) -> list:
    from torch.onnx._internal.exporter import _registration

    if key not in _metas:
        own, functions = _torchlib()
        found = [m for m in own if _key(m.fx_target) == key]
        found += [
            _registration.OnnxDecompMeta(
                onnx_function=f, fx_target=target, signature=None, is_custom=False, is_complex=cplx
            )
            for target, f, cplx in functions.get(key, [])
        ]
        _metas[key] = found
    return _metas[key]


def registry_for(gm: torch.fx.GraphModule):
    """An ONNXRegistry at OPSET holding what `from_torchlib` registers for `gm`'s ops."""
    from torch.onnx._internal.exporter import _registration

    registry = _registration.ONNXRegistry()
    registry._opset_version = OPSET
    keys = {_key(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    for key in sorted(keys, key=str):
        for meta in _metas_of(key):
            registry._register(meta.fx_target, meta)
    registry._cleanup_registry_based_on_opset_version()
    return registry
