"""The adapted model every export starts from, and the example inputs its graphs are traced with.

Shared by the bundle export (`bundle.py`) and the step format (`step_bundle.py`), so the two import
this module and never each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedclip.exporters import tasks
from fedclip.exporters.lora import inject_adapters
from fedclip.exporters.models import BuiltModel, build_base_model
from fedclip.sdk.manifest import AdapterSpec, TaskSpec

DUMMY_BATCH = 2


@dataclass
class AdaptedModel:
    base: BuiltModel
    spec: AdapterSpec
    names: list[str]  # adapter tensor names, sorted

    @property
    def model(self) -> torch.nn.Module:
        return self.base.model

    @property
    def trainable(self) -> list[str]:
        params = dict(self.model.named_parameters())
        return [n for n in self.names if params[n].requires_grad]


def build_adapted_model(
    model: str, adapter: AdapterSpec, pretrained: str | None = None, train: tuple[str, ...] = ()
) -> AdaptedModel:
    """The PyTorch twin of a bundle: same base weights, same adapter names and initial values."""
    base = build_base_model(model, pretrained, seed=adapter.seed)
    names = inject_adapters(base.model, adapter, train)
    return AdaptedModel(base=base, spec=adapter, names=names)


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    import open_clip

    return open_clip.tokenize(texts, context_length=context_length)


def task_graph(adapted: AdaptedModel, task: TaskSpec, from_embeds: bool) -> tuple[torch.nn.Module, tuple]:
    """The training/eval task module, `(x, labels|text) -> (loss, logits) | loss`, and its output names."""
    clip = adapted.model
    if task.kind == "classify":
        tokens = tokenize(task.prompts(), adapted.base.context_length)
        text_adapted = "text" in adapted.spec.towers
        return tasks.ClassifyGraph(clip, tokens, from_embeds, text_adapted), ("loss", "logits")
    return tasks.ContrastiveGraph(clip, from_embeds), ("loss",)


def dummy_inputs(adapted: AdaptedModel, task: TaskSpec, from_embeds: bool) -> tuple[torch.Tensor, ...]:
    """Seeded example inputs of the training graph: image or image embeddings, then labels and
    label_bias (classify) or text (contrastive)."""
    g = torch.Generator().manual_seed(0)
    base = adapted.base
    if from_embeds:
        x = torch.randn(DUMMY_BATCH, base.embed_dim, generator=g)
    else:
        size = base.preprocess.image_size
        x = torch.randn(DUMMY_BATCH, 3, size, size, generator=g)
    if task.kind == "classify":
        y = torch.zeros(DUMMY_BATCH, dtype=torch.long)
        return x, y, torch.zeros(DUMMY_BATCH, len(task.labels))
    return x, tokenize(["a photo."] * DUMMY_BATCH, base.context_length)


def step_cache_key(
    adapted: AdaptedModel, task_module: torch.nn.Module, task_kind: str, from_embeds: bool
) -> dict:
    """What the traced step graphs of `task_module` depend on besides shapes: the architecture, the
    adapter spec (its seed only sets values) and the task graph's code path (export cache key)."""
    spec = adapted.spec
    return {
        "architecture": adapted.base.config,
        "adapter": {
            "kind": spec.kind,
            "rank": spec.rank,
            "alpha": spec.alpha,
            "targets": list(spec.targets),
            "towers": list(spec.towers),
            "init": spec.init,
        },
        "trainable": adapted.trainable,
        "task": task_kind,
        "module": type(task_module).__name__,
        "from_embeds": from_embeds,
        "text_adapted": getattr(task_module, "text_adapted", None),
        "text_len": getattr(task_module, "text_len", None),
    }
