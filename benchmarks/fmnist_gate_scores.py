"""Issue 13: which per-image score makes the best open-set gate? (the product's: Gaussian nearness)

    nice -n 10 python benchmarks/fmnist_gate_scores.py --regime scarce --agents 10 --per-agent 32 \\
        --beta 0.1 --base-steps 40 --seeds 0 1 2 --out /tmp/gate_scores/s32_b40.json
    python benchmarks/fmnist_gate_scores.py --report /tmp/gate_scores/*.json  # -> results/...

The same fleets and training as `fmnist_open_set.py` (fleet-lora with balanced softmax; the images a
gate sends away are scored by the bundle's own model). Each device's gate is fitted on its training
images under its adapter, with one of four scores, and its threshold set at quantile q of that score
over those images:
- `gauss`: the product's (`device_agent.open_set.fit_gate`): minus the Mahalanobis distance to the
  nearest own-label Gaussian, one diagonal variance pooled over the device's labels;
- `knn1` / `knn5`: cosine similarity to the nearest training image / the mean over the 5 nearest
  (nearest-neighbour OOD detection), leave-one-out on the training images (each image is its own
  nearest neighbour);
- `proto`: cosine similarity to the nearest own-label mean (no variance).
Compared at equal own accuracy: each score's all-class, interpolated along its q curve at the
Gaussian's own accuracy, minus the Gaussian's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import write_md_json  # noqa: E402
from _plots import panel_grid  # noqa: E402
from fmnist_ceiling import EVAL_PSEUDO, log_prior, run_main  # noqa: E402
from fmnist_open_set import _ms, embed, local_and_bar, train_fleet  # noqa: E402

from fedclip.device_agent.open_set import fit_gate  # noqa: E402

QUANTILES = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3)
SCORES = ("gauss", "knn1", "knn5", "proto")


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _knn(train: np.ndarray, x: np.ndarray | None, k: int) -> np.ndarray:
    """Mean cosine similarity to the k nearest training images (x None: leave-one-out on train)."""
    s = train @ train.T if x is None else x @ train.T
    if x is None:
        np.fill_diagonal(s, -np.inf)
    return np.sort(s, axis=1)[:, -k:].mean(1)


def score_fns(train: np.ndarray, labels: np.ndarray) -> dict:
    """{score: (its values on the training images, the function of test embeddings)}."""
    gauss = fit_gate(train, labels, 0.05)  # the threshold is set below, per q
    means = _unit(np.stack([train[labels == k].mean(0) for k in np.unique(labels)]))
    return {
        "gauss": (gauss.nearness(train), gauss.nearness),
        "knn1": (_knn(train, None, 1), lambda e: _knn(train, e, 1)),
        "knn5": (_knn(train, None, 5), lambda e: _knn(train, e, 5)),
        "proto": ((train @ means.T).max(1), lambda e: (e @ means.T).max(1)),
    }


def run_seed(pool, transform, args, seed: int) -> dict:
    model, fleet, res, states, fallbacks = train_fleet(pool, transform, args, seed)
    acc: dict[str, list[list[float]]] = {}
    for a in fleet.agents:
        model.load(states[a.name])
        train = _unit(embed(model, a.train_x)[0])
        lp = log_prior(a.train_y, EVAL_PSEUDO)
        sets = []
        for x, y in ((a.own_x, a.own_y), (a.all_x, a.all_y)):
            model.load(states[a.name])
            e, logits = embed(model, x)
            model.load(fallbacks["base"])
            sets.append((_unit(e), logits, embed(model, x)[1], y))
        for name, (on_train, fn) in score_fns(train, a.train_y.numpy()).items():
            on_test = [fn(e) for e, *_ in sets]
            for q in QUANTILES:
                threshold = np.quantile(on_train, q)
                row = acc.setdefault(f"{name} {q}", [[], []])
                for i, (_, logits, base, y) in enumerate(sets):
                    kept = torch.from_numpy(on_test[i] >= threshold)
                    pred = torch.where(kept[:, None], logits + lp, base).argmax(-1)
                    row[i].append(float((pred == y).float().mean()))
    lo, bar = local_and_bar(res)
    out = {k: [100 * float(np.mean(v[0])) - lo, 100 * float(np.mean(v[1])) - bar] for k, v in acc.items()}
    shown = " ".join(f"{k}={o:+.1f}/{x:+.1f}" for k, (o, x) in out.items() if k.endswith((" 0.02", " 0.05")))
    print(f"  s{seed} (own - local-only / all-class - bar): {shown}", flush=True)
    return out


def curve(run: dict, score: str) -> np.ndarray:
    """[len(QUANTILES), 2]: the score's (own - local-only, all-class - bar) at each q, in QUANTILES'
    order (own falls, all-class rises as q grows), means over the run's seeds."""
    seeds = list(run["results"].values())
    return np.array([np.mean([s[f"{score} {q}"] for s in seeds], axis=0) for q in QUANTILES])


def beside_gauss(run: dict) -> dict[str, float]:
    """{score: mean over the Gaussian's q (within the score's range) of all-class at equal own
    accuracy minus the Gaussian's}, points, on the means over seeds."""

    def by_own(score: str) -> tuple[np.ndarray, np.ndarray]:
        own, alls = zip(*sorted(map(tuple, curve(run, score))), strict=True)  # own rising, for interp
        return np.array(own), np.array(alls)

    g_own, g_all = by_own("gauss")
    out = {}
    for name in SCORES[1:]:
        own, alls = by_own(name)
        d = [np.interp(o, own, alls) - a for o, a in zip(g_own, g_all, strict=True) if own[0] <= o <= own[-1]]
        out[name] = float(np.mean(d)) if d else float("nan")
    return out


def plot(runs: dict, path: Path) -> None:
    """One panel per run: each score's q curve, own - local-only against all-class - bar."""
    plt, fig, axes = panel_grid(len(runs), 4, 4.2, 3.9)
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        for score, style in zip(SCORES, ("k.-", "o--", "s--", "^:"), strict=True):
            pts = curve(run, score)
            ax.plot(pts[:, 1], pts[:, 0], style, ms=4, label=score)
        ax.axvline(-2, color="g", lw=0.8, ls="--")
        ax.set(title=name, xlabel="all-class - bar (points)", ylabel="own - local-only (points)")
        ax.legend(fontsize=7)
    fig.suptitle("The open-set gate's score: q 0.002 (top left of each curve) to 0.3", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def own_at_target(run: dict, score: str, target: float = -2.0) -> str:
    """The score's own - local-only where its all-class - bar crosses `target` (means over seeds,
    linear between the q's); `>= x` when even the smallest q is at the target, `-` if none is."""
    pts = curve(run, score)
    if pts[0][1] >= target:
        return f">= {pts[0][0]:+.1f}"
    for (o0, a0), (o1, a1) in zip(pts, pts[1:], strict=False):
        if a0 < target <= a1:
            return f"{o0 + (target - a0) / (a1 - a0) * (o1 - o0):+.1f}"
    return "-"


def write_report(paths: list[Path], out: Path, doc: str) -> None:
    runs = {p.stem: json.loads(Path(p).read_text()) for p in paths}
    lines = ["# FMNIST-FL: which score the open-set gate should use (issue 13)", "",
             doc.split("\n\n", 1)[1].strip("\n"), "", "Runs:", ""]  # fmt: skip
    lines += [f"    {r['command']}" for r in runs.values()]
    lines += ["", "## All-class at equal own accuracy, minus the Gaussian's (points; positive: better)", "",
              "| run | " + " | ".join(SCORES[1:]) + " |", "|---|" + "---:|" * (len(SCORES) - 1)]  # fmt: skip
    besides = {name: beside_gauss(run) for name, run in runs.items()}
    for name, b in besides.items():
        lines.append(f"| {name} | " + " | ".join(f"{b[s]:+.1f}" for s in SCORES[1:]) + " |")
    lines.append(
        "| mean | "
        + " | ".join(f"{np.nanmean([b[s] for b in besides.values()]):+.1f}" for s in SCORES[1:])
        + " |"
    )
    lines += ["", "## Own - local-only where all-class - bar reaches -2 (the target; picked after the runs)",
              "",
              "| run | " + " | ".join(SCORES) + " |", "|---|" + "---:|" * len(SCORES)]  # fmt: skip
    for name, run in runs.items():
        lines.append(f"| {name} | " + " | ".join(own_at_target(run, sc) for sc in SCORES) + " |")
    for name, run in runs.items():
        seeds = list(run["results"].values())
        seed_list = ", ".join(run["results"])
        lines += ["", f"## {name} (seeds {seed_list}): own - local-only / all-class - bar", "",
                  "| score | " + " | ".join(f"q {q}" for q in QUANTILES) + " |",
                  "|---|" + "---:|" * len(QUANTILES)]  # fmt: skip
        for score in SCORES:
            cells = []
            for q in QUANTILES:
                own, alls = zip(*(s[f"{score} {q}"] for s in seeds), strict=True)
                cells.append(f"{_ms(list(own))} / {_ms(list(alls))}")
            lines.append(f"| {score} | " + " | ".join(cells) + " |")
    plot(runs, out / "fmnist_gate_scores.png")
    lines += ["", "![each score's q curve per fleet](fmnist_gate_scores.png)"]
    write_md_json(out, "fmnist_gate_scores", lines, runs)


def main() -> None:
    run_main(__doc__ or "", "fmnist_gate_scores", "fmnist_gate_scores", run_seed, "scarce")


if __name__ == "__main__":
    main()
