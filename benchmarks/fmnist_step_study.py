"""Issue 13, own accuracy: does a larger step close fleet-lora's gap to local-only + 5?

    nice -n 10 python benchmarks/fmnist_step_study.py --agents 15 --per-agent 32 --beta 0.5 \\
        --out /tmp/step_study.json

On the clustered fleet where pooling can pay (`fmnist_ceiling.md`: the group-pooled oracle gives
+6.5 with 5x the steps), two ways to take a larger step than the benchmark's lr 0.005:
- the learning rate itself, for local-only LoRA and for fleet-lora alike (a fair baseline is
  local-only at its own best lr, not at fleet-lora's);
- a server step: each agent's mixed adapter extrapolated past the mix, `x_start + eta (x_mix -
  x_start)` on A and B (FedOpt's server learning rate; eta = 1 is fleet-lora).
Own accuracy, mean over agents, per seed; fleets, model and training as `fmnist_sim.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fmnist_sim as S  # noqa: E402
from fmnist_ceiling import fleet_args, scores, setup  # noqa: E402
from fmnist_regimes import make_fleet  # noqa: E402

from fedclip.coordinator import strategies  # noqa: E402
from fedclip.coordinator.strategies import StrategyOptions  # noqa: E402


def local_only(model: S.Model, fleet, args, lr: float, seed: int) -> dict:
    states = {}
    for i, a in enumerate(fleet.agents):
        model.load(model.init)
        model.train(a.train_x, a.train_y, args.rounds * args.local_epochs, lr, seed * 1000 + i)
        states[a.name] = model.state()
    return states


def fleet_lora(model: S.Model, fleet, args, lr: float, eta: float, seed: int, stats: dict) -> dict:
    strat = strategies.create("fleet-lora", StrategyOptions(lam=1.0, tau=args.tau, seed=seed))
    local = {a.name: dict(model.init) for a in fleet.agents}
    personal: dict = {}
    glob = {n: model.init[n] for n in model.exchanged}
    for r in range(1, args.rounds + 1):
        starts = {a.name: {**local[a.name], **personal.get(a.name, glob)} for a in fleet.agents}
        glob, personal = S.fleet_round(model, strat, fleet, r, args.local_epochs, lr, seed, local, personal,
                                       glob, stats)  # fmt: skip
        personal = {
            k: {n: starts[k][n] + eta * (v[n] - starts[k][n]) for n in v} for k, v in personal.items()
        }
    return {a.name: {**local[a.name], **personal[a.name]} for a in fleet.agents}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fleet_args(ap)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.005, 0.0075, 0.01, 0.015])
    ap.add_argument("--etas", type=float, nargs="+", default=[1.5, 2.0, 3.0], help="server steps at lr 0.005")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    pool, transform = setup(args)
    rows: dict = {}
    for seed in args.seeds:
        fleet = make_fleet(pool, transform, "clustered", args.agents, args.per_agent, seed, args.beta)
        model = S.Model(args.pretrained, S.CLASSES, "lora", "ce-lora", 4, seed)
        model.load(model.init)
        stats = {a.name: model.stats(a) for a in fleet.agents}
        runs = {f"local-only lr {lr:g}": local_only(model, fleet, args, lr, seed) for lr in args.lrs}
        runs |= {
            f"fleet-lora lr {lr:g}": fleet_lora(model, fleet, args, lr, 1.0, seed, stats) for lr in args.lrs
        }
        runs |= {
            f"fleet-lora eta {e:g}": fleet_lora(model, fleet, args, 0.005, e, seed, stats) for e in args.etas
        }
        for name, states in runs.items():
            rows.setdefault(name, []).append(scores(model, fleet, states)["0.0"][0])  # own accuracy
            print(f"  s{seed} {name}: own {rows[name][-1] * 100:.1f}", flush=True)
    print("own accuracy (%), mean ± sd over seeds:")
    for name, v in rows.items():
        print(f"  {name}: {np.mean(v) * 100:.1f} ± {np.std(v) * 100:.1f}")
    doc = {"command": "python benchmarks/fmnist_step_study.py " + " ".join(sys.argv[1:]), "own": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
