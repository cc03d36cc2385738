"""Baseline: full fine-tuning with FedAvg, in one PyTorch process (the benchmark's reference point).

Every client trains every weight of the same base model on the same images the agents use (its
train folder minus the agent's own held-out share, same preprocessing from `fedclip.sdk`), for the
same local epochs, batch size and rounds; the server averages all weights by sample count. Clients
run one after another in this process, so "seconds per round" is the sum of the clients' training
(no network, no process start-up), and the peak RSS is that of one process holding the model, its
optimizer and the clients' preprocessed images.

Run as a script it prints one JSON object (so the caller can measure its peak RSS):
    python benchmarks/fmnist_fullft.py --pretrained W.pt --data DIR --rounds R --seed S
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmnist_base import _graph, accuracy  # noqa: E402

from fedclip.exporters.models import build_base_model  # noqa: E402
from fedclip.sdk.data import Dataset  # noqa: E402
from fedclip.sdk.partition import read_summary  # noqa: E402
from fedclip.sdk.preprocess import ImageTransform  # noqa: E402


def _load(ds: Dataset, transform: ImageTransform) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for sample, pixels in ds.iter_images(transform):
        xs.append(pixels)
        ys.append(sample.label)
    return torch.from_numpy(np.stack(xs)), torch.tensor(ys, dtype=torch.int64)


def fullft_fedavg(
    pretrained: str,
    data_dir: Path,
    rounds: int,
    local_epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 32,
    holdout: float = 0.2,
    seed: int = 0,
    model: str = "fedclip-tiny",
) -> dict:
    torch.manual_seed(seed)
    summary = read_summary(data_dir)
    labels, agents = tuple(summary["labels"]), list(summary["agents"])
    base = build_base_model(model, pretrained, seed=seed)
    graph = _graph(base.model, labels, base.context_length)
    params = dict(graph.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    transform = ImageTransform(base.preprocess)
    train, test = {}, {}
    for a in agents:
        # The agent trains on its train folder minus the held-out share it keeps for its metrics.
        tr, _ = Dataset.open(data_dir / a / "train", labels=labels).split(holdout)
        train[a] = _load(tr, transform)
        test[a] = _load(Dataset.open(data_dir / a / "test", labels=labels), transform)
    n_params = sum(p.numel() for p in params.values())
    param_bytes = sum(p.numel() * p.element_size() for p in params.values())
    global_state = {k: v.detach().clone() for k, v in params.items()}

    def evaluate() -> dict[str, float]:
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(global_state[k])
        return {a: accuracy(graph, *test[a]) for a in agents}

    curve = [evaluate()]
    round_seconds = []
    for r in range(1, rounds + 1):
        t0 = time.perf_counter()
        sums = {k: torch.zeros_like(v) for k, v in global_state.items()}
        total = 0
        for i, a in enumerate(agents):
            x, y = train[a]
            with torch.no_grad():
                for k, p in params.items():
                    p.copy_(global_state[k])
            opt = torch.optim.AdamW(params.values(), lr=lr)
            gen = torch.Generator().manual_seed(seed * 1000 + r * 100 + i)
            graph.train()
            for _ in range(local_epochs):
                order = torch.randperm(len(y), generator=gen)
                for s in range(0, len(y), batch_size):
                    idx = order[s : s + batch_size]
                    loss = F.cross_entropy(graph.logits(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            with torch.no_grad():
                for k, p in params.items():
                    sums[k] += p.detach() * len(y)
            total += len(y)
        global_state = {k: v / max(1, total) for k, v in sums.items()}
        round_seconds.append(time.perf_counter() - t0)
        curve.append(evaluate())
    bytes_per_round = 2 * len(agents) * param_bytes  # every client downloads and uploads all weights
    return {
        "method": "full-ft-fedavg",
        "agents": agents,
        "accuracy_per_round": {a: [c[a] for c in curve] for a in agents},
        "round_seconds": round_seconds,
        "uplink_bytes_per_round": len(agents) * param_bytes,
        "downlink_bytes_per_round": len(agents) * param_bytes,
        "bytes_per_round": bytes_per_round,
        "trainable_parameters": n_params,
        "exchanged_tensor_bytes": param_bytes,
        "agents_per_round": len(agents),
        "lr": lr,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = fullft_fedavg(
        args.pretrained, args.data, args.rounds, args.local_epochs, args.lr, args.batch_size, seed=args.seed
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
