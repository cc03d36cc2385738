"""The text encoder graph of a bundle: `text -> (text_embeds, logit_scale)`, for open vocabulary.

A classify bundle's inference graph has its label prompts built in, so a device could only ever
classify against the labels of the export. This graph runs the text tower alone, with the text-tower
adapter tensors as overridable initializers (like the inference graph's), so the device embeds any
labels or prompts with the adapter it has installed, then scores them against `image_embeds` of the
inference graph: logits = logit_scale * normalize(image_embeds) @ normalize(text_embeds).T, the
formula of `tasks.ClassifyGraph`. `logit_scale` is `exp(clip.logit_scale)` repeated per text row (a
graph output needs the batch axis), so the device needs no number the manifest does not carry.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fedclip.exporters import onnx_export
from fedclip.exporters.tasks import ClipParts
from fedclip.sdk.manifest import GraphSpec

TEXT_ENCODER = "text_encoder.onnx"
_DUMMY_BATCH = 2


class TextEncoder(ClipParts):
    """`text [B, context] int64 -> (text_embeds [B, D] unnormalized, logit_scale [B])`."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__(clip, vision=False, text=True)

    def forward(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.encode_text(text)
        scale = self.logit_scale.exp().reshape(1).expand(text.shape[0])
        return embeds, scale


def write_text_encoder(
    clip: nn.Module, adapter_names: list[str], context_length: int, out_dir: Path
) -> GraphSpec:
    """Export the text encoder of `clip` (adapters injected) into `out_dir`; its GraphSpec."""
    from fedclip.exporters.adapted import tokenize

    module = TextEncoder(clip)
    text = tokenize(["a photo."] * _DUMMY_BATCH, context_length)
    proto = onnx_export.export_onnx(module, (text,), ("text",), ("text_embeds", "logit_scale"))
    have = set(onnx_export.initializer_names(proto))
    # Only the text tower's adapter tensors are in this graph; the device overrides them by name.
    onnx_export.make_overridable(proto, [n for n in adapter_names if n in have])
    onnx_export.save(proto, Path(out_dir) / TEXT_ENCODER)
    return GraphSpec(file=TEXT_ENCODER, inputs=("text",), outputs=("text_embeds", "logit_scale"))
