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

from dataclasses import dataclass, field

import numpy as np
import torch

from fedclip.sdk.partition import CameraShift, LabeledImages, agent_shifts

POOL_TRAIN = 7000  # pool images [0, 7000) are training images, [7000, 10000) test images
OWN_TEST = 100
ALL_PER_LABEL = 20


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


def _agent(pool, transform, name, shift, mix, group, n_train, train_s, test_rng, bal, seed) -> AgentData:
    tr = train_s.by_mix(mix, n_train)
    # Each agent draws its own test split from the whole test part (test images may repeat across
    # agents, never within one): with skewed mixes a shared pool would run out of a popular label.
    own = _Sampler(pool.labels, POOL_TRAIN, len(pool.labels), test_rng).by_mix(mix, OWN_TEST)
    y = torch.from_numpy(pool.labels.astype(np.int64))
    return AgentData(
        name, shift, mix, group,
        _pixels(pool, tr, shift, transform, seed), y[tr],
        _pixels(pool, own, shift, transform, seed), y[own],
        _pixels(pool, bal, shift, transform, seed), y[bal],
    )  # fmt: skip


def make_fleet(
    pool: LabeledImages,
    transform,
    regime: str,
    agents: int,
    per_agent: int,
    seed: int,
    beta: float = 0.1,
    groups: int = 3,
    conc: float = 20.0,
    newcomers: int = 0,
    newcomer_images: int = 16,
) -> Fleet:
    """The fleet of one regime and seed; `per_agent` labelled images each (80% of them in today's)."""
    rng = np.random.default_rng([seed, 0xF1EE7])
    train_s = _Sampler(pool.labels, 0, POOL_TRAIN, rng)
    test_s = _Sampler(pool.labels, POOL_TRAIN, len(pool.labels), rng)
    n_train = int(round(per_agent * 0.8)) if regime == "today" else per_agent
    # One balanced set of image ids for every agent's all-class test (each under its own shift), so
    # all-class accuracies compare across agents, and one unshifted for the global model.
    bal = test_s.draw(np.full(10, ALL_PER_LABEL))
    gidx = test_s.draw(np.full(10, 30))
    out = []
    if regime == "clustered":
        shifts = agent_shifts(groups, seed)  # distinct camera kinds: agent_shifts cycles through them
        centers = [rng.dirichlet(np.full(10, beta)) for _ in range(groups)]
        member = [i % groups for i in range(agents)]
        for i, g in enumerate(member):
            mix = rng.dirichlet(conc * centers[g] + 1e-3)
            out.append(
                _agent(pool, transform, f"agent-{i:02d}", shifts[g], mix, g, n_train, train_s, rng, bal, seed)
            )
        extra = []
        for j in range(newcomers):
            g = j % groups
            mix = rng.dirichlet(conc * centers[g] + 1e-3)
            extra.append(
                _agent(
                    pool,
                    transform,
                    f"new-{j:02d}",
                    shifts[g],
                    mix,
                    g,
                    newcomer_images,
                    train_s,
                    rng,
                    bal,
                    seed,
                )
            )
    else:
        shifts = agent_shifts(agents, seed)
        for i in range(agents):
            mix = rng.dirichlet(np.full(10, beta))
            out.append(
                _agent(pool, transform, f"agent-{i:02d}", shifts[i], mix, i, n_train, train_s, rng, bal, seed)
            )
        extra = []
    gx = _pixels(pool, gidx, CameraShift(), transform, seed)
    gy = torch.from_numpy(pool.labels.astype(np.int64))[gidx]
    return Fleet(regime, out, gx, gy, extra)
