"""The FMNIST benchmark's base model and data: honest stand-ins for pretrained CLIP weights.

No pretrained CLIP weights can be downloaded where fedclip is built, so the benchmark makes its own
base: `fedclip-tiny` (random init) trained contrastively on a public split of Fashion-MNIST with
captions "a photo of a {label}.", for a fixed budget of steps. Because the ten captions repeat, each
image's positive is its own caption among the ten distinct ones (the supervised form of CLIP's
loss; its image-to-text half is exactly the bundle's classify loss). The weights are saved as an
open_clip state dict, which `fedclip-coord export --pretrained FILE` loads.

Data split, so that no client image was seen in pretraining:
- public split: the first `public_n` images of the official Fashion-MNIST *train* set;
- client pool: the official *test* set (10,000 images), partitioned among the agents.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedclip.exporters.bundle import tokenize
from fedclip.exporters.models import build_base_model
from fedclip.exporters.tasks import ClassifyGraph
from fedclip.sdk.partition import LabeledImages, load_fashion_mnist
from fedclip.sdk.preprocess import ImageTransform

PROMPT = "a photo of a {}."  # the exporter's default prompt, so zero-shot uses the same captions
FMNIST_TRAIN = 60_000  # load_fashion_mnist() concatenates train (60k) then test (10k)


def split_fmnist(public_n: int) -> tuple[LabeledImages, LabeledImages]:
    """(public pretraining split from the train set, client pool = the official test set)."""
    data = load_fashion_mnist()
    if len(data) != FMNIST_TRAIN + 10_000:
        raise RuntimeError(f"unexpected Fashion-MNIST size {len(data)}")
    public = LabeledImages(labels=data.labels[:public_n], classes=data.classes, arrays=data.arrays[:public_n])
    pool = LabeledImages(
        labels=data.labels[FMNIST_TRAIN:], classes=data.classes, arrays=data.arrays[FMNIST_TRAIN:]
    )
    return public, pool


def _pixels(images: LabeledImages, transform: ImageTransform) -> torch.Tensor:
    return torch.from_numpy(np.stack([transform(images.image(i)) for i in range(len(images))]))


def _graph(clip: torch.nn.Module, classes: tuple[str, ...], context_length: int) -> ClassifyGraph:
    tokens = tokenize([PROMPT.format(c) for c in classes], context_length)
    return ClassifyGraph(clip, tokens, from_embeds=False, text_adapted=True)


@torch.no_grad()
def accuracy(graph: ClassifyGraph, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    graph.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((graph.logits(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum())
    return correct / max(1, len(y))


def pretrain_base(
    out: Path,
    public_n: int = 5000,
    steps: int = 300,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    model: str = "fedclip-tiny",
) -> dict:
    """Pretrain `model` on the public split; save `out` (.pt); return zero-shot accuracies and cost."""
    torch.manual_seed(seed)
    base = build_base_model(model, None, seed=seed)
    clip = base.model
    # Every weight trains except the 49k-token embedding table: only the ten captions' tokens would
    # get gradients, and its dense AdamW update would cost more than the rest of the model.
    for name, p in clip.named_parameters():
        p.requires_grad_(name != "token_embedding.weight")
    public, pool = split_fmnist(public_n)
    transform = ImageTransform(base.preprocess)
    x, y = _pixels(public, transform), torch.from_numpy(public.labels)
    pool_x, pool_y = _pixels(pool, transform), torch.from_numpy(pool.labels)
    graph = _graph(clip, public.classes, base.context_length)
    before = accuracy(graph, pool_x, pool_y)
    opt = torch.optim.AdamW([p for p in graph.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    graph.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        logits = graph.logits(x[idx])
        # image -> caption over the ten captions, and caption -> image within the batch (every
        # image of the same label is a positive: uniform target over them).
        loss_i = F.cross_entropy(logits, y[idx])
        same = (y[idx][:, None] == y[idx][None, :]).float()
        per_text = logits[:, y[idx]].t()  # [B captions, B images]
        loss_t = -(F.log_softmax(per_text, dim=-1) * same / same.sum(-1, keepdim=True)).sum(-1).mean()
        loss = 0.5 * (loss_i + loss_t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    after = accuracy(graph, pool_x, pool_y)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone() for k, v in clip.state_dict().items()}, out)
    info = {
        "model": model,
        "weights": str(out),
        "public_images": public_n,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "seconds": seconds,
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-20:])),
        "zero_shot_pool_accuracy_random_init": before,
        "zero_shot_pool_accuracy": after,
        "prompt": PROMPT,
    }
    out.with_suffix(".json").write_text(json.dumps(info, indent=1))
    return info
