"""Issue 13's cold start with balanced softmax: what a newcomer gets on joining a fleet-lora fleet.

    nice -n 10 python benchmarks/fmnist_coldstart.py --agents 15 --per-agent 32 --beta 0.5 \
        --seeds 0 1 2 --out /tmp/coldstart.json

The clustered fleet of `fmnist_regimes.py` (in-process, as `fmnist_ceiling.py`), with 3 newcomers of
16 labelled images each. The members train `--rounds` rounds of fleet-lora, with plain CE and with
balanced softmax. A newcomer then gets, before any local training:
- `mix`: the members' adapters weighted by data similarity to it (`newcomer_weights`, fleet-lora's
  cold-start rule), or
- `global`: the fleet's global adapter,
scored with its own label prior (from its 16 images, the product's inference pseudo-count) added at
weight 0, 0.5 and 1. The baseline is local-only: the newcomer's 16 images alone, rounds x epochs.
Printed and written: own and all-class accuracy minus local-only's, mean ± sd over seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist_ceiling as C  # noqa: E402
import fmnist_sim as S  # noqa: E402
from fmnist_regimes import make_fleet  # noqa: E402

from fedclip.coordinator import strategies  # noqa: E402
from fedclip.coordinator.strategies import StrategyOptions  # noqa: E402
from fedclip.coordinator.strategies.fleet_mix import newcomer_weights  # noqa: E402
from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR  # noqa: E402


def _score(model: S.Model, a, scale: float) -> tuple[float, float]:
    lp = C.log_prior(a.train_y, C.EVAL_PSEUDO)
    return (
        S._hits(model.logits(a.own_x) + scale * lp, a.own_y),
        S._hits(model.logits(a.all_x) + scale * lp, a.all_y),
    )


def run_seed(pool, transform, args, seed: int) -> dict[str, list[float]]:
    fleet = make_fleet(
        pool, transform, "clustered", args.agents, args.per_agent, seed, args.beta, newcomers=3
    )
    model = S.Model(args.pretrained, S.CLASSES, "lora", "ce-lora", 4, seed)
    stats = {a.name: model.stats(a) for a in fleet.agents + fleet.newcomers}
    names = [a.name for a in fleet.agents]
    res: dict[str, list[float]] = {}
    alone = []
    for j, a in enumerate(fleet.newcomers):
        model.load(model.init)
        model.train(a.train_x, a.train_y, args.rounds * args.local_epochs, args.lr, seed * 7000 + j)
        alone.append(_score(model, a, 0.0))
    res["local-only (16 images)"] = list(np.mean(alone, axis=0))
    for bsm in (False, True):
        strat = strategies.create("fleet-lora", StrategyOptions(lam=1.0, tau=args.tau, seed=seed))
        glob = {n: model.init[n] for n in model.exchanged}
        personal: dict = {}
        local = {a.name: dict(model.init) for a in fleet.agents}
        biases = None
        if bsm:
            biases = {
                a.name: C.log_prior(a.train_y, C.TRAIN_PSEUDO).expand(len(a.train_y), -1)
                for a in fleet.agents
            }
        members = {n: stats[n] for n in names}
        for r in range(1, args.rounds + 1):
            glob, personal = S.fleet_round(
                model,
                strat,
                fleet,
                r,
                args.local_epochs,
                args.lr,
                seed,
                local,
                personal,
                glob,
                members,
                biases,
            )
        for mode in ("mix", "global"):
            got: dict[float, list] = {s: [] for s in C.PRIOR_SCALES}
            for a in fleet.newcomers:
                join = dict(glob)
                if mode == "mix":
                    st = [stats[n] for n in names] + [stats[a.name]]
                    hist = np.stack([s[STAT_LABEL_HIST] for s in st])
                    w = newcomer_weights(
                        hist, [s[STAT_MEAN] for s in st], [s[STAT_VAR] for s in st], args.tau
                    )
                    join = {
                        n: sum(w[k] * personal[names[k]][n] for k in range(len(names)))
                        for n in model.exchanged
                    }
                model.load({**model.init, **join})
                for s in got:
                    got[s].append(_score(model, a, s))
            for s, v in got.items():
                res[f"fleet-lora{'-bsm' if bsm else ''} {mode}, prior x{s}"] = list(np.mean(v, axis=0))
        if not bsm:
            res.update(member_ceiling(model, fleet, personal))
    return res


def member_ceiling(model: S.Model, fleet, personal: dict) -> dict[str, list[float]]:
    """What choosing among the members' adapters can give a newcomer at best (plain CE, no prior):
    the best member's adapter (an oracle, chosen on the newcomer's own test split), the member whose
    adapter has the lowest loss on the newcomer's 16 labelled images (no training, but its images
    used), members mixed by that loss (softmax of -loss / 0.1), and its camera group's mean (an
    oracle: the newcomer's group is not known to the coordinator)."""
    rows: dict[str, list] = {k: [] for k in CEILING_ROWS}
    for a in fleet.newcomers:
        scores, losses = [], []
        for b in fleet.agents:
            model.load({**model.init, **personal[b.name]})
            scores.append(_score(model, a, 0.0))
            losses.append(float(F.cross_entropy(model.logits(a.train_x), a.train_y)))
        w = np.exp(-(np.asarray(losses) - min(losses)) / 0.1)
        group = np.array([float(b.group == a.group) for b in fleet.agents])
        rows[CEILING_ROWS[0]].append(max(scores))
        rows[CEILING_ROWS[1]].append(scores[int(np.argmin(losses))])
        for key, weights in ((CEILING_ROWS[2], w / w.sum()), (CEILING_ROWS[3], group / group.sum())):
            mixed = {n: sum(wk * personal[b.name][n] for wk, b in zip(weights, fleet.agents, strict=True))
                     for n in model.exchanged}  # fmt: skip
            model.load({**model.init, **mixed})
            rows[key].append(_score(model, a, 0.0))
    return {k: list(np.mean(v, axis=0)) for k, v in rows.items()}


CEILING_ROWS = (
    "best member's adapter (oracle)",
    "member by loss on its 16 images",
    "members mixed by loss on its 16 images",
    "its camera group's mean (oracle)",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.fleet_args(ap)
    ap.add_argument("--out", type=Path, required=True, help="the JSON file for the results")
    args = ap.parse_args()
    pool, transform = C.setup(args)
    t0 = time.monotonic()
    rows = {str(seed): run_seed(pool, transform, args, seed) for seed in args.seeds}
    base = "local-only (16 images)"
    summary = {}
    print("minus local-only on the newcomer's 16 images (points, mean ± sd over seeds): own / all-class")
    for k in rows[str(args.seeds[0])]:
        d = 100 * np.array([np.subtract(r[k], r[base]) for r in rows.values()])
        summary[k] = {"own": [d[:, 0].mean(), d[:, 0].std()], "all": [d[:, 1].mean(), d[:, 1].std()]}
        (o, so), (al, sa) = summary[k]["own"], summary[k]["all"]
        print(f"  {k}: {o:+.1f} ± {so:.1f} / {al:+.1f} ± {sa:.1f}")
    doc = {
        "protocol": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "command": "python benchmarks/fmnist_coldstart.py " + " ".join(sys.argv[1:]),
        "results": rows,
        "minus_local_only": summary,
        "seconds": time.monotonic() - t0,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
