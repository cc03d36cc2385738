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

from fedclip.sdk.errors import ExportError

FROZEN = re.compile(r"^frozen_(\d+)$")


def frozen_name(i: int) -> str:
    return f"frozen_{i}"


def strip_weights(model: onnx.ModelProto) -> bytes:
    """The serialized graph with the data of every `frozen_<i>` initializer removed."""
    for t in model.graph.initializer:
        if FROZEN.match(t.name):
            t.ClearField("raw_data")
    return model.SerializeToString()


def fill_weights(template: bytes, frozen: Sequence[torch.Tensor]) -> onnx.ModelProto:
    """The graph of `template` with the values of `frozen` as its weights; shapes and dtypes must match."""
    model = onnx.load_from_string(template)
    for t in model.graph.initializer:
        m = FROZEN.match(t.name)
        if not m:
            continue
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
        t.raw_data = arr.tobytes()
    return model
