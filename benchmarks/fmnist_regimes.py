"""The fleets FMNIST-FL is run on: who holds which labels under which camera, as in-memory tensors.

Every agent gets a label mix p_i, a camera shift (`fedclip.sdk.partition.CameraShift`) and three
image sets drawn from the official Fashion-MNIST *test* set (never seen in pretraining):
- `train`: its labelled images (N_i of them, drawn by p_i), from the first 7,000 pool images;
- `own`: 100 held-out images drawn by p_i under its shift (its own test split);
- `all`: a balanced set of every label (20 each) under its shift (what it faces when a label it
  has not trained on shows up).
The test sets come from the last 3,000 pool images, so no test image is anyone's training image.

Regimes (`make_fleet`):
- `today`: Dirichlet(beta) label mix and one shift per agent, `per_agent` images (80% train);
- `scarce`: the same with 32 or 64 labelled images per agent;
- `clustered`: 3 groups; a group shares one camera shift and a label mix (each agent's mix is drawn
  around its group's: Dirichlet(conc * q_g));
- a cold-start agent (`newcomer`) drawn like a clustered agent with 16 labelled images.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedclip.sdk.all_class import ALL_SPLIT
from fedclip.sdk.partition import SUMMARY_NAME, CameraShift, LabeledImages, agent_shifts

POOL_TRAIN = 7000  # pool images [0, 7000) are training images, [7000, 10000) test images
OWN_TEST = 100
ALL_PER_LABEL = 20
GLOBAL_DIR = "global"  # `write_fleet`: the balanced, unshifted set the global model is scored on


@dataclass
class AgentData:
    name: str
    shift: CameraShift
    mix: np.ndarray  # [L] label probabilities
    group: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    own_x: torch.Tensor
    own_y: torch.Tensor
    all_x: torch.Tensor
    all_y: torch.Tensor


@dataclass
class Fleet:
    regime: str
    agents: list[AgentData]
    global_x: torch.Tensor  # balanced, unshifted
    global_y: torch.Tensor
    newcomers: list[AgentData] = field(default_factory=list)


class _Sampler:
    """Draws image indices without replacement, per label, from one part of the pool."""

    def __init__(self, labels: np.ndarray, lo: int, hi: int, rng: np.random.Generator) -> None:
        self.rng = rng
        self.free = {k: list(rng.permutation(np.flatnonzero(labels[lo:hi] == k) + lo)) for k in range(10)}

    def draw(self, counts: np.ndarray) -> np.ndarray:
        out = []
        for k, c in enumerate(counts):
            c = min(int(c), len(self.free[k]))
            out += self.free[k][:c]
            del self.free[k][:c]
        return np.asarray(out, dtype=np.int64)

    def by_mix(self, mix: np.ndarray, n: int) -> np.ndarray:
        counts = self.rng.multinomial(n, mix)
        return self.draw(counts)


def _pixels(pool: LabeledImages, idx: np.ndarray, shift: CameraShift, transform, seed: int) -> torch.Tensor:
    arr = [transform(shift.apply(pool.image(int(i)), noise_seed=seed * 1_000_003 + int(i))) for i in idx]
    return torch.from_numpy(np.stack(arr))


@dataclass
class AgentDraw:
    """Which pool images one agent holds (indices), under which shift: a regime before any pixel."""

    name: str
    shift: CameraShift
    mix: np.ndarray
    group: int
    train: np.ndarray
    own: np.ndarray


@dataclass
class FleetDraw:
    agents: list[AgentDraw]
    newcomers: list[AgentDraw]
    balanced: np.ndarray  # every agent's all-class test images (each under its own shift)
    global_: np.ndarray  # balanced, unshifted


def _shifts(n: int, seed: int, cameras: bool) -> list[CameraShift]:
    return agent_shifts(n, seed) if cameras else [CameraShift() for _ in range(n)]


def draw_fleet(
    labels: np.ndarray,
    regime: str,
    agents: int,
    per_agent: int,
    seed: int,
    beta: float = 0.1,
    groups: int = 3,
    conc: float = 20.0,
    newcomers: int = 0,
    newcomer_images: int = 16,
    cameras: bool = True,
) -> FleetDraw:
    """The images of one regime and seed, as pool indices (`make_fleet`, `write_fleet` use them).

    `cameras=False` gives every agent the unshifted camera (FLoRA's protocol: the global model's
    test images look like the training images); the label mixes and image draws stay the same.
    """
    rng = np.random.default_rng([seed, 0xF1EE7])
    train_s = _Sampler(labels, 0, POOL_TRAIN, rng)
    test_s = _Sampler(labels, POOL_TRAIN, len(labels), rng)
    n_train = int(round(per_agent * 0.8)) if regime == "today" else per_agent
    # One balanced set of image ids for every agent's all-class test (each under its own shift), so
    # all-class accuracies compare across agents, and one unshifted for the global model.
    bal = test_s.draw(np.full(10, ALL_PER_LABEL))
    gidx = test_s.draw(np.full(10, 30))

    def agent(name: str, shift: CameraShift, mix: np.ndarray, group: int, n: int) -> AgentDraw:
        tr = train_s.by_mix(mix, n)
        # Each agent draws its own test split from the whole test part (test images may repeat across
        # agents, never within one): with skewed mixes a shared pool would run out of a popular label.
        own = _Sampler(labels, POOL_TRAIN, len(labels), rng).by_mix(mix, OWN_TEST)
        return AgentDraw(name, shift, mix, group, tr, own)

    out, extra = [], []
    if regime == "clustered":
        shifts = _shifts(groups, seed, cameras)  # distinct camera kinds: agent_shifts cycles through them
        centers = [rng.dirichlet(np.full(10, beta)) for _ in range(groups)]
        for i in range(agents):
            g = i % groups
            out.append(
                agent(f"agent-{i:02d}", shifts[g], rng.dirichlet(conc * centers[g] + 1e-3), g, n_train)
            )
        for j in range(newcomers):
            g = j % groups
            mix = rng.dirichlet(conc * centers[g] + 1e-3)
            extra.append(agent(f"new-{j:02d}", shifts[g], mix, g, newcomer_images))
    else:
        shifts = _shifts(agents, seed, cameras)
        for i in range(agents):
            out.append(agent(f"agent-{i:02d}", shifts[i], rng.dirichlet(np.full(10, beta)), i, n_train))
    return FleetDraw(out, extra, bal, gidx)


def make_fleet(pool: LabeledImages, transform, regime: str, agents: int, per_agent: int, seed: int,
               beta: float = 0.1, **kw) -> Fleet:  # fmt: skip
    """The fleet of one regime and seed as tensors; `per_agent` labelled images each (80% in today's)."""
    d = draw_fleet(pool.labels, regime, agents, per_agent, seed, beta, **kw)
    y = torch.from_numpy(pool.labels.astype(np.int64))

    def px(idx: np.ndarray, shift: CameraShift) -> torch.Tensor:
        return _pixels(pool, idx, shift, transform, seed)

    def data(a: AgentDraw) -> AgentData:
        return AgentData(a.name, a.shift, a.mix, a.group, px(a.train, a.shift), y[a.train],
                         px(a.own, a.shift), y[a.own], px(d.balanced, a.shift), y[d.balanced])  # fmt: skip

    return Fleet(regime, [data(a) for a in d.agents], px(d.global_, CameraShift()), y[d.global_],
                 [data(a) for a in d.newcomers])  # fmt: skip


def write_fleet(out: Path, pool: LabeledImages, regime: str, agents: int, per_agent: int, seed: int,
                beta: float = 0.1, **kw) -> dict:  # fmt: skip
    """The same fleet as image folders for the real path (`fmnist_fl.py --regime`).

    `<agent>/train`, `<agent>/test` (its own split) and `<agent>/all` (the balanced set under its
    shift), one folder per label; `global/` (the balanced, unshifted set the global model is scored
    on, FLoRA's protocol); and `partition.json` as `sdk.partition.write_partition` writes it
    (agents, labels, each agent's shift and counts; `groups` added).
    """
    d = draw_fleet(pool.labels, regime, agents, per_agent, seed, beta, **kw)

    def write(folder: Path, idx: np.ndarray, shift: CameraShift) -> dict[str, int]:
        for name in pool.classes:
            (folder / name).mkdir(parents=True, exist_ok=True)
        for i in idx.tolist():
            img = shift.apply(pool.image(int(i)), noise_seed=seed * 1_000_003 + int(i))
            img.save(folder / pool.classes[pool.labels[i]] / f"{i:06d}.png")
        counts = np.bincount(pool.labels[idx], minlength=len(pool.classes))
        return {name: int(c) for name, c in zip(pool.classes, counts, strict=True)}

    summary: dict = {"dataset": "fashion-mnist", "agents": [a.name for a in d.agents], "regime": regime,
                     "seed": seed, "labels": list(pool.classes), "counts": {},
                     "groups": {a.name: a.group for a in [*d.agents, *d.newcomers]}}  # fmt: skip
    if d.newcomers:  # agents that join later (`fmnist_newcomers_real.py`), written like the others
        summary["newcomers"] = [a.name for a in d.newcomers]
    for a in [*d.agents, *d.newcomers]:
        entry: dict = {"shift": asdict(a.shift)}
        for split, idx in (("train", a.train), ("test", a.own), (ALL_SPLIT, d.balanced)):
            entry[split] = write(out / a.name / split, idx, a.shift)
        summary["counts"][a.name] = entry
    summary["global"] = write(out / GLOBAL_DIR, d.global_, CameraShift())
    (out / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
