"""Issue 13: does a device serving two adapters (its own and the fleet's) reach the own target?

    nice -n 10 python benchmarks/fmnist_ensemble.py --regime scarce --agents 10 --per-agent 32 \\
        --beta 0.1 --base-steps 40 --out /tmp/ens/scarce32_base40.json
    python benchmarks/fmnist_ensemble.py --report /tmp/ens/*.json   # -> results/fmnist_ensemble.*

`fmnist_ceiling.md` bounds what one adapter of fedclip's class (LoRA r 4 on q, v) gains from the
fleet: trained on every image of the fleet, it is not local-only + 5 on the device's own split where
devices hold one or two labels. A device could serve two adapters instead: the one it trained alone
(`local-only`, plain CE, 15 epochs) and the one the fleet gave it (`fleet-lora-bsm`, the
coordinator's `fleet-lora` strategy over balanced softmax, 5 rounds x 3 epochs, its label prior x1
added at inference). This script scores their ensembles, in-process (`fmnist_sim.py`'s fleets,
model and training, as `fmnist_ceiling.py`):
- `prob w`: w * softmax(local-only) + (1 - w) * softmax(fleet-lora-bsm + prior), w in 0.25, 0.5, 0.75;
- `logit w`: the same mix of the two adapters' log-probabilities (a product of experts).
Each on the own split and the all-class set, beside both members alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fmnist_sim as S  # noqa: E402
from fmnist_ceiling import EVAL_PSEUDO, federated, log_prior, pooled, run_main  # noqa: E402
from fmnist_regimes import make_fleet  # noqa: E402

WEIGHTS = (0.25, 0.5, 0.75)  # the local-only adapter's share


def _logits(model: S.Model, state: dict, a) -> tuple[torch.Tensor, torch.Tensor]:
    model.load(state)
    return model.logits(a.own_x), model.logits(a.all_x)


def mixes(local: torch.Tensor, fleet: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores whose argmax is each ensemble's answer (local-only's share w first)."""
    lp_local, lp_fleet = torch.log_softmax(local, -1), torch.log_softmax(fleet, -1)
    out = {"local-only": local, "fleet-lora-bsm": fleet}
    for w in WEIGHTS:
        out[f"prob {w:g}"] = w * lp_local.exp() + (1 - w) * lp_fleet.exp()
        out[f"logit {w:g}"] = w * lp_local + (1 - w) * lp_fleet
    return out


def run_seed(pool, transform, args, seed: int) -> dict:
    fleet = make_fleet(pool, transform, args.regime, args.agents, args.per_agent, seed, args.beta)
    model = S.Model(args.pretrained, S.CLASSES, "lora", "ce-lora", 4, seed)
    epochs = args.rounds * args.local_epochs  # local-only's, as fmnist_ceiling's
    local = pooled(model, fleet, lambda a: [a], epochs, args.lr)
    personal, _ = federated(model, fleet, "fleet-lora", args, seed, bsm=True)
    per: dict[str, tuple[list[float], list[float]]] = {}
    for a in fleet.agents:
        lo_own, lo_all = _logits(model, local[a.name], a)
        fl_own, fl_all = _logits(model, personal[a.name], a)
        prior = log_prior(a.train_y, EVAL_PSEUDO)  # the product's inference prior, x1
        own = mixes(lo_own, fl_own + prior)
        every = mixes(lo_all, fl_all + prior)
        for name in own:
            hits = per.setdefault(name, ([], []))
            hits[0].append(S._hits(own[name], a.own_y))
            hits[1].append(S._hits(every[name], a.all_y))
    res = {name: (float(np.mean(o)), float(np.mean(al))) for name, (o, al) in per.items()}
    for name, (o, al) in res.items():
        print(f"  s{seed} {name}: {o * 100:.1f}/{al * 100:.1f}", flush=True)
    return res


def main() -> None:
    run_main(__doc__ or "", "fmnist_ensemble", "fmnist_ensemble_report", run_seed, "scarce")


if __name__ == "__main__":
    main()
