"""Torch modules whose ONNX exports are the bundle graphs (names fixed by docs/internals.md).

Each module is a `ClipParts`: it re-registers the CLIP submodules it uses under their CLIP attribute
names, so every parameter keeps its CLIP name (`visual.transformer.resblocks.0.attn.q_proj.lora_A`,
...) in the ONNX initializers and in adapter files.
"""

from __future__ import annotations

from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn


def trim_label_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Label prompt tokens cut after the longest prompt's end-of-text token.

    Exact for CLIP's causal text tower: position i attends to positions <= i only, so the padding
    after a prompt's end-of-text token never reaches its pooled (end-of-text) feature. It saves
    running the text tower over the full context (77 tokens) for prompts of a few tokens.
    """
    end = int(tokens.to(torch.int32).argmax(dim=-1).max()) + 1
    return tokens[:, :end].clone()


class OpenClip(Protocol):
    """The attributes of open_clip's `CLIP` the graphs take over. Models travel as `nn.Module`, whose
    `__getattr__` types every attribute `Tensor | Module`; this says what each one is."""

    visual: nn.Module
    transformer: nn.Module
    token_embedding: nn.Module
    positional_embedding: nn.Parameter
    ln_final: nn.Module
    text_projection: nn.Parameter | nn.Linear
    attn_mask: torch.Tensor
    logit_scale: nn.Parameter


class ClipParts(nn.Module, OpenClip):
    """The CLIP pieces a graph needs, under CLIP's own attribute names; every graph module is one.

    It declares itself an `OpenClip` for the attribute types: a piece exists only when its tower was
    asked for (`vision`, `text`), and is then what open_clip's is.
    """

    attn_mask: torch.Tensor  # a buffer (register_buffer), so assigned where mypy does not look
    # The label prompts' length for traced graphs (a Python int, so slices are constants), or None.
    text_len: int | None = None

    def __init__(self, model: nn.Module, vision: bool, text: bool) -> None:
        super().__init__()
        clip = cast(OpenClip, model)  # open_clip's CLIP, or a model of the same layout
        if vision:
            self.visual = clip.visual
        if text:
            self.transformer = clip.transformer
            self.token_embedding = clip.token_embedding
            self.positional_embedding = clip.positional_embedding
            self.ln_final = clip.ln_final
            self.text_projection = clip.text_projection
            self.register_buffer("attn_mask", clip.attn_mask.clone(), persistent=False)
        self.logit_scale = clip.logit_scale

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """CLIP.encode_text with argmax pooling, written so ORT CPU can run it.

        ORT CPU has no int64 ArgMax, so the end-of-text position (the largest token id) is found
        on int32 tokens; token ids are < 2**31. Text shorter than the context (trimmed label
        prompts) uses the leading positional embeddings and causal-mask block. The TorchScript
        tracer turns `text.shape[1]` into a graph value, so traced graphs take the length from
        the module's `text_len` (a Python int, constant slices); graphs without one (contrastive
        text inputs at the full context) are unchanged.
        """
        n = self.text_len
        if n is None and not torch.jit.is_tracing() and text.shape[1] < self.positional_embedding.shape[0]:
            n = text.shape[1]
        pos: torch.Tensor  # the whole Parameter, or a slice of it
        if n is None:
            pos, attn_mask = self.positional_embedding, self.attn_mask
        else:
            pos, attn_mask = self.positional_embedding[:n], self.attn_mask[:n, :n]
        x = self.token_embedding(text) + pos
        x = self.transformer(x, attn_mask=attn_mask)
        x = self.ln_final(x)
        eot = text.to(torch.int32).argmax(dim=-1)
        # A 0/1 mask-sum instead of gather: ORT's training graph builder aborts on the gather's
        # gradient here, and x * 0 + ... is exact, so the pooled value is bit-identical.
        positions = torch.arange(text.shape[1], device=text.device)
        mask = (positions.unsqueeze(0) == eot.unsqueeze(1)).to(x.dtype)
        pooled = (x * mask.unsqueeze(-1)).sum(dim=1)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(pooled)
        return pooled @ self.text_projection


def _norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


class _Classifier(ClipParts):
    """What classify's training and inference graphs share: logits over the labels' prompts.

    Without a text adapter the class text embeddings are constants computed here, at export;
    with one, the prompts run through the text tower trimmed to their longest end-of-text token
    (`trim_label_tokens`), which gives the full-context result exactly at a fraction of the cost.
    """

    label_tokens: torch.Tensor  # with a text adapter
    class_text_embeds: torch.Tensor  # without one

    def __init__(
        self, clip: nn.Module, label_tokens: torch.Tensor, from_embeds: bool, text_adapted: bool
    ) -> None:
        super().__init__(clip, vision=not from_embeds, text=text_adapted)
        self.from_embeds = from_embeds
        self.text_adapted = text_adapted
        label_tokens = trim_label_tokens(label_tokens)
        # A Python int (None at the full context): traced graphs slice by constants.
        n = int(label_tokens.shape[1])
        self.text_len = n if n < cast(OpenClip, clip).positional_embedding.shape[0] else None
        if text_adapted:
            self.register_buffer("label_tokens", label_tokens)
        else:
            with torch.no_grad():
                full = ClipParts(clip, vision=False, text=True)
                embeds = _norm(full.encode_text(label_tokens))
            self.register_buffer("class_text_embeds", embeds.detach().clone())

    def text_features(self) -> torch.Tensor:
        if self.text_adapted:
            return _norm(self.encode_text(self.label_tokens))
        return self.class_text_embeds

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        img = x if self.from_embeds else self.encode_image(x)
        return self.logit_scale.exp() * _norm(img) @ self.text_features().t()


class ClassifyGraph(_Classifier):
    """`(image | image_embeds, labels, label_bias) -> (loss, logits)`.

    `label_bias` [batch, labels] is added to the logits inside the loss only (balanced softmax:
    `sdk.label_prior`); zeros give plain cross-entropy. `logits` stay the model's own. Without it
    (bundles of manifest format 1, rebuilt for `add_step_format`) the loss is plain cross-entropy.
    """

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor, label_bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.logits(x)
        adjusted = logits if label_bias is None else logits + label_bias
        return F.cross_entropy(adjusted, labels), logits


class ClassifyInference(_Classifier):
    """`image -> (logits, image_embeds)`."""

    def __init__(self, clip: nn.Module, label_tokens: torch.Tensor, text_adapted: bool) -> None:
        super().__init__(clip, label_tokens, from_embeds=False, text_adapted=text_adapted)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.encode_image(image)
        return self.logit_scale.exp() * _norm(img) @ self.text_features().t(), img


class ContrastiveGraph(ClipParts):
    """`(image | image_embeds, text) -> loss`: CLIP's symmetric InfoNCE over the batch."""

    def __init__(self, clip: nn.Module, from_embeds: bool) -> None:
        super().__init__(clip, vision=not from_embeds, text=True)
        self.from_embeds = from_embeds

    def logits(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        img = x if self.from_embeds else self.encode_image(x)
        return self.logit_scale.exp() * _norm(img) @ _norm(self.encode_text(text)).t()

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        logits = self.logits(x, text)
        target = torch.arange(logits.shape[0], device=logits.device)
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


class ContrastiveInference(ClipParts):
    """`(image, text) -> (image_embeds, text_embeds)`, both unnormalized."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__(clip, vision=True, text=True)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encode_image(image), self.encode_text(text)


class ImageEncoder(nn.Module):
    """`image -> image_embeds` of the frozen vision tower (text-tower-only bundles)."""

    visual: nn.Module

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.visual = cast(OpenClip, clip).visual

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)
