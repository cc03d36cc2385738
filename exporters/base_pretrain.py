"""A pretrained fedclip-tiny base, made in seconds and cached: the stand-in for pretrained CLIP.

No pretrained CLIP weights can be downloaded where fedclip is built, so the base is made here:
`fedclip-tiny` (random init) trained contrastively on a public split of Fashion-MNIST with
captions "a photo of a {label}.", for a fixed budget of steps. Because the ten captions repeat, each
image's positive is its own caption among the ten distinct ones (the supervised form of CLIP's
loss; its image-to-text half is exactly the bundle's classify loss). The weights are saved as an
open_clip state dict, which `fedclip-coord export --pretrained FILE` loads.

Data split, so that no client image was seen in pretraining:
- public split: the first `public_n` images of the official Fashion-MNIST *train* set;
- client pool: the official *test* set (10,000 images), partitioned among the agents.

`cached_base(cache_dir)` returns the weights, pretraining only when no finished file with the same
settings is there (the sidecar JSON names them). Torch and the exporters are imported by the
functions that need them (this module is the coordinator's; like the export command, it is the
torch side).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedclip.exporters.export_cache import default_cache_dir
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.partition import LabeledImages, load_fashion_mnist
from fedclip.sdk.preprocess import ImageTransform

# The benchmark's base: pretraining steps (session 14's "weaker base" has 40). The demo's default
# (coordinator.demo.config) is the same number; the coordinator may not import this package.
BASE_STEPS = 300

if TYPE_CHECKING:
    import torch

    from fedclip.exporters.tasks import ClassifyGraph

PROMPT = "a photo of a {}."  # the exporter's default prompt, so zero-shot uses the same captions
FMNIST_TRAIN = 60_000  # load_fashion_mnist() concatenates train (60k) then test (10k)


def split_fmnist(public_n: int) -> tuple[LabeledImages, LabeledImages]:
    """(public pretraining split from the train set, client pool = the official test set)."""
    data = load_fashion_mnist()
    if len(data) != FMNIST_TRAIN + 10_000:
        raise RuntimeError(f"unexpected Fashion-MNIST size {len(data)}")
    assert data.arrays is not None  # load_fashion_mnist keeps the images in memory
    public = LabeledImages(labels=data.labels[:public_n], classes=data.classes, arrays=data.arrays[:public_n])
    pool = LabeledImages(
        labels=data.labels[FMNIST_TRAIN:], classes=data.classes, arrays=data.arrays[FMNIST_TRAIN:]
    )
    return public, pool


def _pixels(images: LabeledImages, transform: ImageTransform) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.stack([transform(images.image(i)) for i in range(len(images))]))


def _graph(clip: torch.nn.Module, classes: tuple[str, ...], context_length: int) -> ClassifyGraph:
    from fedclip.exporters.adapted import tokenize
    from fedclip.exporters.tasks import ClassifyGraph

    tokens = tokenize([PROMPT.format(c) for c in classes], context_length)
    return ClassifyGraph(clip, tokens, from_embeds=False, text_adapted=True)


def accuracy(graph: ClassifyGraph, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    import torch

    graph.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += int((graph.logits(x[i : i + batch]).argmax(-1) == y[i : i + batch]).sum())
    return correct / max(1, len(y))


def pretrain_base(
    out: Path,
    public_n: int = 5000,
    steps: int = BASE_STEPS,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    model: str = "fedclip-tiny",
    eval_n: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """Pretrain `model` on the public split; save `out` (.pt); return zero-shot accuracies and cost.

    Zero-shot accuracy is measured on the client pool's first `eval_n` images (all by default).
    `on_step(step, loss)` is called after every step (progress for the caller to show).
    """
    import torch
    import torch.nn.functional as F

    from fedclip.exporters.models import build_base_model

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
    if eval_n is not None:
        assert pool.arrays is not None  # split_fmnist's images are in memory
        pool = LabeledImages(labels=pool.labels[:eval_n], classes=pool.classes, arrays=pool.arrays[:eval_n])
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
        if on_step is not None:
            on_step(len(losses), losses[-1])
    seconds = time.perf_counter() - t0
    after = accuracy(graph, pool_x, pool_y)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Renamed into place (a cached file is always a finished one); per process, so two demos that
    # pretrain at once into one cache do not write the same file.
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    torch.save({k: v.detach().clone() for k, v in clip.state_dict().items()}, tmp)
    os.replace(tmp, out)
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
        "zero_shot_eval_images": len(pool_y),
    }
    atomic_write(out.with_suffix(".json"), json.dumps(info, indent=1).encode(), mode=0o644)
    return info


def cached_base(
    cache_dir: Path,
    public_n: int = 5000,
    steps: int = BASE_STEPS,
    seed: int = 0,
    model: str = "fedclip-tiny",
    eval_n: int | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> dict:
    """The pretrained base under `cache_dir` (its info dict, `weights` = the .pt path); made if missing.

    Reused when the sidecar JSON records the same settings and the weights file exists, so a demo
    pretrains once (about 10-90 s on two CPUs) and starts from a useful base every later run.
    """
    out = Path(cache_dir) / f"{model}-fmnist-n{public_n}-s{steps}-seed{seed}.pt"
    info_path = out.with_suffix(".json")
    if out.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        want = {"model": model, "public_images": public_n, "steps": steps, "seed": seed}
        if all(info.get(k) == v for k, v in want.items()):
            return {**info, "weights": str(out), "cached": True}
    info = pretrain_base(out, public_n, steps, seed=seed, model=model, eval_n=eval_n, on_step=on_step)
    return {**info, "cached": False}


def default_base_cache() -> Path:
    """$FEDCLIP_BASE_CACHE_DIR, else `base` beside the export cache (~/.cache/fedclip/base): one
    folder holds what a demo re-run reuses."""
    env = os.environ.get("FEDCLIP_BASE_CACHE_DIR")
    return Path(env) if env else default_cache_dir().parent / "base"


def _print_step(total: int, every: int = 5) -> Callable[[int, float], None]:
    """Progress on stderr, a line every `every` steps: `step K/N loss X` (the demo shows it as a bar)."""

    def show(step: int, loss: float) -> None:
        if step == 1 or step % every == 0 or step == total:
            print(f"step {step}/{total} loss {loss:.3f}", file=sys.stderr, flush=True)

    return show


def main(argv: list[str] | None = None) -> int:
    """`python -m fedclip.exporters.base_pretrain [--cache DIR]`: print the cached base's info as JSON.

    For callers that keep torch out of their own process (the demo runs it as a child, like export).
    """
    import argparse

    ap = argparse.ArgumentParser(description="Pretrain (or reuse) the fedclip-tiny FMNIST base.")
    ap.add_argument("--cache", type=Path, default=None, help="cache folder (default: default_base_cache())")
    ap.add_argument("--public-n", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=BASE_STEPS)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-n", type=int, default=None, help="zero-shot on this many pool images (all)")
    args = ap.parse_args(argv)
    if args.public_n < 1 or args.steps < 1:
        print("error: --public-n and --steps must be >= 1", flush=True)
        return 2
    info = cached_base(
        args.cache if args.cache is not None else default_base_cache(),
        args.public_n,
        args.steps,
        args.seed,
        eval_n=args.eval_n,
        on_step=_print_step(args.steps),
    )
    print(json.dumps(info), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
