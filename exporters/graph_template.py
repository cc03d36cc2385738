"""A traced step graph with its weights left out, and the weights filled back in.

The step graphs' frozen weights are the initializers `frozen_<i>` (i: position in the task
module's frozen tensors, see `step_graph._frozen_tensors`). They are graph inputs while the
optimizer runs (`step_graph._optimize`), so no initializer is ever computed from a weight: every
other initializer is a constant of the architecture, and the template holds it as it is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import onnx
import torch
from onnx import helper

from fedclip.exporters.step_weights import MIN_BYTES, WeightsFile
from fedclip.sdk.errors import ExportError

FROZEN = re.compile(r"^frozen_(\d+)$")


def frozen_name(i: int) -> str:
    return f"frozen_{i}"


def clear_weights(model: onnx.ModelProto) -> None:
    """Remove the data of every `frozen_<i>` initializer, in place."""
    for t in model.graph.initializer:
        if FROZEN.match(t.name):
            t.ClearField("raw_data")


def strip_weights(model: onnx.ModelProto) -> bytes:
    """The serialized graph with the data of every `frozen_<i>` initializer removed."""
    clear_weights(model)
    return model.SerializeToString()


def _frozen_array(t: onnx.TensorProto, frozen: Sequence[torch.Tensor]):
    """(i, array of `frozen[i]`) when `t` is the weight `frozen_<i>` (shape and dtype checked), else None."""
    m = FROZEN.match(t.name)
    if not m:
        return None
    i = int(m.group(1))
    if i >= len(frozen):
        raise ExportError(f"export cache: graph weight {t.name} has no tensor in the model")
    arr = frozen[i].detach().cpu().contiguous().numpy()
    want = helper.tensor_dtype_to_np_dtype(t.data_type)
    if arr.dtype != want or tuple(arr.shape) != tuple(t.dims):
        raise ExportError(
            f"export cache: {t.name} is {arr.dtype}{list(arr.shape)} in the model, "
            f"{want}{list(t.dims)} in the graph"
        )
    return i, arr


def fill_weights(template: bytes, frozen: Sequence[torch.Tensor]) -> onnx.ModelProto:
    """The graph of `template` with the values of `frozen` as its weights; shapes and dtypes must match."""
    model = onnx.load_from_string(template)
    for t in model.graph.initializer:
        if (found := _frozen_array(t, frozen)) is not None:
            t.raw_data = found[1].tobytes()
    return model


def fill_shared(template: bytes, frozen: Sequence[torch.Tensor], weights: WeightsFile) -> onnx.ModelProto:
    """`fill_weights`, the weights (and any other initializer of MIN_BYTES or more) pointing into the
    shared `weights` file instead of held in the graph: what saving `fill_weights`'s graph and then
    `share_weights` on it gives, without writing and re-reading the weights in between. A weight
    placed for an earlier graph of the same export (same `frozen`) is not hashed again."""
    model = onnx.load_from_string(template)
    for t in model.graph.initializer:  # in graph order: the file's layout is share_weights'
        if (found := _frozen_array(t, frozen)) is not None:
            i, arr = found
            if arr.nbytes >= MIN_BYTES:
                weights.refer(t, arr.tobytes(), key=("frozen", id(frozen[i])))
            else:
                t.raw_data = arr.tobytes()
        elif t.HasField("raw_data") and len(t.raw_data) >= MIN_BYTES:
            weights.refer(t, t.raw_data)
    return model


def forward_part(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """The subgraph of `model` computing `outputs` from the graph inputs `inputs` (and initializers).

    The step graph computes the task graph's outputs on its way to the loss, so the eval graph is
    cut out of it instead of traced a second time. Raises ValueError when an output needs another
    graph input (the caller then traces the eval graph itself).
    """
    g = model.graph
    producer = {out: node for node in g.node for out in node.output if out}
    initializers = {t.name for t in g.initializer}
    given = set(inputs)
    keep: set[int] = set()
    todo = list(outputs)
    while todo:
        name = todo.pop()
        if not name or name in given or name in initializers:
            continue
        node = producer.get(name)
        if node is None:
            raise ValueError(f"{name!r} needs a graph input outside {list(inputs)[:3]}...")
        if id(node) in keep:
            continue
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"node {node.name} has a subgraph")
        keep.add(id(node))
        todo.extend(node.input)
    nodes = [n for n in g.node if id(n) in keep]
    used = {name for n in nodes for name in n.input} | set(outputs)
    produced = {name for n in nodes for name in n.output}
    by_name = {vi.name: vi for vi in (*g.input, *g.output)}
    missing = [n for n in (*inputs, *outputs) if n not in by_name]
    if missing:
        raise ValueError(f"{missing[0]!r} is not an input or output of the graph")
    graph = helper.make_graph(
        nodes,
        g.name,
        [by_name[n] for n in inputs],
        [by_name[n] for n in outputs],
        initializer=[t for t in g.initializer if t.name in used],
        value_info=[vi for vi in g.value_info if vi.name in produced],
    )
    out = helper.make_model(graph, opset_imports=list(model.opset_import), producer_name=model.producer_name)
    out.ir_version = model.ir_version
    out.producer_version = model.producer_version
    return out


def drop_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Remove graph outputs (their nodes stay: something else reads them, e.g. logits -> loss)."""
    for vi in [o for o in model.graph.output if o.name in set(names)]:
        model.graph.output.remove(vi)
