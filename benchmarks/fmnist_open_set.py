"""Issue 13, scarce fleets: can an open-set gate keep the unseen labels without the own-accuracy cost?

    nice -n 10 python benchmarks/fmnist_open_set.py --regime scarce --agents 10 --per-agent 32 \\
        --beta 0.1 --base-steps 40 --out /tmp/open_set/scarce32_b40.json
    python benchmarks/fmnist_open_set.py --report /tmp/open_set/*.json   # -> results/fmnist_open_set.*

A device trained with balanced softmax adds its label prior back at inference (`logits + w log pi`).
In a scarce fleet an agent holds one or two labels, so at the product's w = 1 the prior all but
rules out the labels it has never seen (all-class 8-13 points under the bar), and at w = 0 it gives
back 4-9 points of own accuracy (`fmnist_ceiling.md`): the prior weight moves along one frontier.

The gate tried here decides per image whether the prior applies (`device_agent.open_set`, the
product's, since this session). The agent fits a Gaussian per own label to its training images'
embeddings under its own adapter (one diagonal variance pooled over its labels: it holds 16-32
images a label); an image whose nearest own-label Gaussian is further than the q-quantile of its
own training images' distances is taken as a label it has not seen:
- `gate-personal q`: such an image is classified by the same adapter without the prior (w = 0);
- `gate-global q`: by the global adapter of a FedAvg-LoRA run with balanced softmax (no prior),
  one more adapter on the device and a second forward pass for those images;
- `gate-fleet q`: the same with the adapter the fleet-lora run itself publishes as its global one
  (the sample-weighted mean of the round's updates), what a device of that fleet can be sent;
- `gate-base q`: the same with no adapter at all: the bundle's own model, which every device has.
Everything else as `fmnist_ceiling.py`: fleet-lora with balanced softmax (the strategy that meets
the clustered targets), 5 rounds x 3 local epochs, local-only 15 epochs; scored in-process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fmnist_sim as S  # noqa: E402
from _plots import panel_grid  # noqa: E402
from fmnist_ceiling import (  # noqa: E402
    EVAL_PSEUDO,
    federated,
    log_prior,
    pooled,
    run_main,
    scores,
)
from fmnist_regimes import make_fleet  # noqa: E402

from fedclip.device_agent.open_set import fit_gate  # noqa: E402

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the prior weights of the frontier
QUANTILES = (0.02, 0.05, 0.1, 0.2)  # the gate's thresholds


@torch.no_grad()
def embed(model: S.Model, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(unit image embeddings, logits) under the loaded adapter, one forward pass."""
    model.graph.eval()
    e = F.normalize(model.graph.encode_image(x), dim=-1)
    return e.double().numpy(), model.graph.logit_scale.exp() * e @ model.graph.text_features().t()


def gated(model: S.Model, fleet, states: dict, fallbacks: dict[str, dict]) -> dict:
    """{`gate-personal q` | `gate-<fallback> q`: (own, all-class, share of own / all-class images
    kept under the prior)}: means over agents; `fallbacks`: adapters by name."""
    acc: dict[str, list[list[float]]] = {}
    for a in fleet.agents:
        model.load(states[a.name])
        train_e, _ = embed(model, a.train_x)
        train_y = a.train_y.numpy()
        lp = log_prior(a.train_y, EVAL_PSEUDO)
        gates = {q: fit_gate(train_e, train_y, q) for q in QUANTILES}  # the product's gate
        sets = []
        for x, y in ((a.own_x, a.own_y), (a.all_x, a.all_y)):
            model.load(states[a.name])
            e, logits = embed(model, x)
            other = {"personal": logits}
            for name, tensors in fallbacks.items():
                model.load(tensors)
                other[name] = embed(model, x)[1]
            sets.append((e, logits, other, y))
        for q, gate in gates.items():
            for fallback in ("personal", *fallbacks):
                row = acc.setdefault(f"gate-{fallback} {q}", [[], [], [], []])
                for i, (e, logits, other, y) in enumerate(sets):
                    kept = torch.from_numpy(gate.keeps(e))
                    pred = torch.where(kept[:, None], logits + lp, other[fallback]).argmax(-1)
                    row[i].append(float((pred == y).float().mean()))
                    row[2 + i].append(float(kept.float().mean()))
    return {k: [float(np.mean(v)) for v in row] for k, row in acc.items()}


def train_fleet(pool, transform, args, seed: int) -> tuple[S.Model, Any, dict, dict, dict]:
    """(model, fleet, baseline scores, fleet-lora-bsm adapters by agent, fallback adapters by name):
    the seed's fleet with zero-shot, local-only, FedAvg-LoRA-bsm and fleet-lora-bsm trained."""
    fleet = make_fleet(pool, transform, args.regime, args.agents, args.per_agent, seed, args.beta)
    model = S.Model(args.pretrained, S.CLASSES, "lora", "ce-lora", 4, seed)
    res: dict = {"zero-shot": scores(model, fleet, {a.name: model.init for a in fleet.agents})}
    alone = pooled(model, fleet, lambda a: [a], args.rounds * args.local_epochs, args.lr)
    res["local-only"] = scores(model, fleet, alone)
    fedavg, glob = federated(model, fleet, "fedavg", args, seed, bsm=True)
    res["fedavg-bsm"] = scores(model, fleet, fedavg, (1.0,))
    states, fleet_mean = federated(model, fleet, "fleet-lora", args, seed, bsm=True)
    res["fleet-lora-bsm"] = scores(model, fleet, states, WEIGHTS)
    fallbacks = {"global": {**model.init, **glob}, "fleet": {**model.init, **fleet_mean}, "base": model.init}
    return model, fleet, res, states, fallbacks


def local_and_bar(res: dict) -> tuple[float, float]:
    """(local-only's own accuracy, the all-class bar: the better of zero-shot and FedAvg-LoRA-bsm), %."""
    bar = max(res["zero-shot"]["0.0"][1], res["fedavg-bsm"]["1.0"][1])
    return 100 * res["local-only"]["0.0"][0], 100 * bar


def run_seed(pool, transform, args, seed: int) -> dict:
    model, fleet, res, states, fallbacks = train_fleet(pool, transform, args, seed)
    res.update(gated(model, fleet, states, fallbacks))
    lo, bar = local_and_bar(res)
    for k in ("fleet-lora-bsm", *(k for k in res if k.startswith("gate-"))):
        pts = res[k].items() if isinstance(res[k], dict) else [("", res[k])]
        shown = " ".join(f"{w}:{100 * v[0] - lo:+.1f}/{100 * v[1] - bar:+.1f}" for w, v in pts)
        print(f"  s{seed} {k} (own - local-only / all-class - bar): {shown}", flush=True)
    return res


# ---- report ---------------------------------------------------------------------------------------
def points(run: dict) -> dict[str, tuple[list[float], list[float]]]:
    """{row: (own - local-only per seed, all-class - bar per seed)}, points."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for s in run["results"].values():
        lo, bar = local_and_bar(s)
        rows = {f"prior x{w}": v for w, v in s["fleet-lora-bsm"].items()}
        rows.update({k: v for k, v in s.items() if k.startswith("gate-")})
        for k, v in rows.items():
            own, alls = out.setdefault(k, ([], []))
            own.append(100 * v[0] - lo)
            alls.append(100 * v[1] - bar)
    return out


def beside_frontier(pts: dict, own: float, alls: float) -> float | None:
    """All-class minus the prior-weight frontier's all-class at the same own accuracy (mean
    points, linear between the weights); None where `own` lies outside the frontier's range."""
    curve = sorted((np.mean(o), np.mean(a)) for k, (o, a) in pts.items() if k.startswith("prior"))
    xs, ys = zip(*curve, strict=True)
    return None if not xs[0] <= own <= xs[-1] else alls - float(np.interp(own, xs, ys))


def _ms(xs: list[float]) -> str:
    return f"{np.mean(xs):+.1f} ± {np.std(xs, ddof=1) if len(xs) > 1 else 0.0:.1f}"


def _name(run: dict) -> str:
    p = run["protocol"]
    return f"{p['regime']} {p['agents']} x {p['per_agent']}, base {p['base_steps']} steps"


def write_report(paths: list[Path], out: Path, doc: str) -> None:
    import json

    runs = [json.loads(Path(p).read_text()) for p in paths]
    lines = ["# FMNIST-FL: an open-set gate for the label prior (issue 13, scarce fleets)", "",
             doc.split("\n\n", 1)[1].strip("\n"), "", "Runs:", ""]  # fmt: skip
    lines += [f"    {r['command']}" for r in runs]
    lines += ["", "Points, mean ± sd over seeds of the mean over agents: own minus local-only (target >= +5) "
              "/ all-class minus the bar (the better of zero-shot and FedAvg-LoRA with balanced softmax at "
              "prior x1; target >= -2). `kept`: share of own / all-class test images the gate left under "
              "the prior. `beside the frontier`: the gate's all-class minus the prior weight's at the same "
              "own accuracy (means, linear between the weights 0, 0.25, ..., 1; positive: right of the "
              "frontier in the plot).", ""]  # fmt: skip
    plt, fig, axes = panel_grid(len(runs), 3, 4.4, 4)
    for run, ax in zip(runs, axes, strict=True):
        pts = points(run)
        seeds = list(run["results"].values())
        lines += [f"## {_name(run)} (seeds {', '.join(run['results'])})", "",
                  "| fleet-lora-bsm, inference | own - local-only | all-class - bar | kept (own / all-class) "
                  "| all-class beside the frontier | both targets |",
                  "|---|---:|---:|---:|---:|---|"]  # fmt: skip
        for k, (own, alls) in pts.items():
            kept, beside = "-", None
            if k.startswith("gate-"):
                kept = f"{np.mean([s[k][2] for s in seeds]):.2f} / {np.mean([s[k][3] for s in seeds]):.2f}"
                beside = beside_frontier(pts, float(np.mean(own)), float(np.mean(alls)))
            met = "**yes**" if np.mean(own) >= 5 and np.mean(alls) >= -2 else "no"
            shown = "-" if beside is None else f"{beside:+.1f}"
            lines.append(f"| {k} | {_ms(own)} | {_ms(alls)} | {kept} | {shown} | {met} |")
        lines.append("")
        frontier = [(np.mean(a), np.mean(o)) for k, (o, a) in pts.items() if k.startswith("prior")]
        ax.plot(*zip(*frontier, strict=True), "k.-", label="prior weight 0 ... 1")
        for fb, mk in (("personal", "o"), ("global", "s"), ("fleet", "^"), ("base", "x")):
            g = [(np.mean(a), np.mean(o)) for k, (o, a) in pts.items() if k.startswith(f"gate-{fb}")]
            ax.plot(*zip(*g, strict=True), mk, label=f"gate, unseen -> {fb}")
        ax.axvline(-2, color="g", lw=0.8, ls="--")
        ax.axhline(5, color="g", lw=0.8, ls="--")
        ax.set(title=_name(run), xlabel="all-class - bar (points)", ylabel="own - local-only (points)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "fmnist_open_set.png", dpi=110)
    notes = out / "fmnist_open_set_notes.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    (out / "fmnist_open_set.md").write_text("\n".join(lines))
    (out / "fmnist_open_set.json").write_text(json.dumps({"runs": runs}, indent=1))


def main() -> None:
    run_main(__doc__ or "", "fmnist_open_set", "fmnist_open_set", run_seed, "scarce")


if __name__ == "__main__":
    main()
