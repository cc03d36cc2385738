"""Issue 13's 20-round target: how far any global model can get on the balanced unshifted test set.

    nice -n 10 python benchmarks/fmnist_global_ceiling.py --out /tmp/global/ceiling.json
    python benchmarks/fmnist_global_ceiling.py --report /tmp/global/ceiling.json

The target asks FedAvg-LoRA's global model for zero-shot + 10 points after 20 rounds. A federated
global model can at best match one model trained centrally on every agent's images, so this trains
that oracle on today's fleet (10 agents x 300 images, Dirichlet 0.1: the pooled images keep the
fleet's label skew) over a grid, and reports the best cell of each column (chosen on the test set
itself: an optimistic ceiling):
- `pooled LoRA`: the benchmark's adapter (LoRA r 4 on q, v of both towers), lr x epochs;
- `pooled LoRA, balanced softmax`: the same with each image's loss logit-adjusted by its agent's
  label prior (the product's `--loss balanced-softmax`), scored without a prior;
- `pooled full FT`: every weight but the token table.
Each with the fleet's cameras (every training image carries its agent's shift; the global test
set does not) and without (`cameras=False`, FLoRA's protocol). Beside them, what the federated
methods reach on the same fleets: FedAvg-LoRA (plain CE and balanced softmax) and full-FT FedAvg,
20 rounds of 1 local epoch, the global model scored after every round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fmnist_sim as S  # noqa: E402
from fmnist_ceiling import (  # noqa: E402
    TRAIN_PSEUDO,
    federated,
    fleet_args,
    log_prior,
    report_instead,
    setup,
    write_run,
)
from fmnist_regimes import make_fleet  # noqa: E402

# (column, lrs, epochs): a grid wide enough that its best cell is not an artefact of one lr
GRID = (
    ("pooled LoRA", (5e-3, 1e-3, 3e-4), (3, 10, 20)),
    ("pooled LoRA, balanced softmax", (5e-3, 1e-3, 3e-4), (3, 10, 20)),
    ("pooled full FT", (1e-4, 3e-5), (3, 10, 20)),
)
SETTINGS = (("cameras", True), ("no shift", False))
# `--reference`: the model's own ceiling, trained on every training image of the pool (7,000,
# balanced, unshifted: 3x the fleet's images without its label skew)
REFERENCE = (("LoRA", (5e-3, 1e-3), (1, 3, 6)), ("full FT", (1e-4, 3e-5), (1, 3, 6)))


def _models(args, seed: int) -> tuple[S.Model, S.Model]:
    """(the benchmark's LoRA model, the same base for full fine-tuning)."""
    lora = S.Model(args.pretrained, S.CLASSES, "lora", "ce-lora", 4, seed)
    return lora, S.full_weights(S.Model(args.pretrained, S.CLASSES, "lora", "ce-lora", 4, seed))


def trained_grid(grid, models, fleet, x, y, seed: int, bias=None) -> dict:
    """{column: {"lr x epochs": global accuracy}}, each cell trained from the base on (x, y); the
    columns named "balanced" add `bias` (each image's agent's log prior) to the logits in the loss."""
    lora, full = models
    inits = {id(lora): lora.init, id(full): full.state()}
    out: dict = {}
    for column, lrs, epochs in grid:
        model = full if "full" in column else lora
        cells = out[column] = {}
        for lr in lrs:
            for ep in epochs:
                model.load(inits[id(model)])
                model.train(x, y, ep, lr, 7 + seed, bias if "balanced" in column else None)
                cells[f"{lr:g} x {ep}"] = model.accuracy(fleet.global_x, fleet.global_y)
    return out


def run_seed(pool, transform, args, seed: int) -> dict:
    """{setting: {"zero-shot": acc, column: {"lr x ep": acc}}} on the global test set."""
    out: dict = {}
    for setting, cameras in SETTINGS:
        fleet = make_fleet(pool, transform, "today", args.agents, args.per_agent, seed, args.beta,
                           cameras=cameras)  # fmt: skip
        x = torch.cat([a.train_x for a in fleet.agents])
        y = torch.cat([a.train_y for a in fleet.agents])
        bias = torch.cat([log_prior(a.train_y, TRAIN_PSEUDO).expand(len(a.train_y), -1)
                          for a in fleet.agents])  # fmt: skip
        lora, _ = models = _models(args, seed)
        res: dict = {"zero-shot": lora.accuracy(fleet.global_x, fleet.global_y), "pooled images": len(y)}
        for column, cells in trained_grid(GRID, models, fleet, x, y, seed, bias).items():
            res[column] = cells
            best = max(cells, key=cells.__getitem__)
            print(f"  s{seed} {setting} {column}: best {cells[best] * 100:.1f}% at {best}", flush=True)
        # The federated runs of the same fleet: FedAvg-LoRA (plain CE and balanced softmax) and
        # full-FT FedAvg, `args.rounds` rounds of `args.local_epochs`, the global model every round.
        for bsm in (False, True):
            res["fedavg-lora" + ("-bsm" if bsm else "")] = fedavg_rounds(lora, fleet, args, seed, bsm)
        res["full-ft-fedavg"] = S.run_fullft(fleet, args, seed)["global_"]
        print(f"  s{seed} {setting} after {args.rounds} rounds: "
              + ", ".join(f"{k} {res[k][-1] * 100:.1f}%" for k in FEDERATED), flush=True)  # fmt: skip
        out[setting] = res
    return out


FEDERATED = ("fedavg-lora", "fedavg-lora-bsm", "full-ft-fedavg")


def fedavg_rounds(model: S.Model, fleet, args, seed: int, bsm: bool) -> list[float]:
    """The global adapter's accuracy on the global test set before and after each FedAvg round."""

    def score(glob: dict) -> None:
        model.load({**model.init, **glob})
        accs.append(model.accuracy(fleet.global_x, fleet.global_y))

    accs: list[float] = []
    score({})
    federated(model, fleet, "fedavg", args, seed, bsm, each_round=score)
    return accs


def reference(pool, transform, args, seed: int) -> dict:
    """{column: {"lr x ep": acc}}: trained on all of the pool's training images, no shift."""
    from fmnist_regimes import POOL_TRAIN, _pixels

    from fedclip.sdk.partition import CameraShift

    fleet = make_fleet(pool, transform, "today", args.agents, args.per_agent, seed, args.beta)
    idx = torch.arange(POOL_TRAIN).numpy()
    x = _pixels(pool, idx, CameraShift(), transform, seed)
    y = torch.from_numpy(pool.labels[idx].astype("int64"))
    out: dict = {"images": len(y), **trained_grid(REFERENCE, _models(args, seed), fleet, x, y, seed)}
    print(f"  s{seed} reference: {out}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fleet_args(ap)
    ap.set_defaults(agents=10, per_agent=300, beta=0.1, rounds=20, local_epochs=1, rank=4)
    ap.add_argument("--fullft-lr", type=float, default=1e-4)
    ap.add_argument("--out", type=Path, help="the JSON file for the results")
    ap.add_argument("--report", type=Path, help="write results/fmnist_global_ceiling.md from this JSON")
    ap.add_argument("--reference", action="store_true", help="add the pool-trained reference to --out")
    args = ap.parse_args()
    if report_instead(ap, args, "fmnist_global_report"):
        return
    pool, transform = setup(args)
    if args.reference:
        doc = json.loads(args.out.read_text())
        doc["reference"] = {str(seed): reference(pool, transform, args, seed) for seed in args.seeds}
        doc["reference_command"] = "python benchmarks/fmnist_global_ceiling.py " + " ".join(sys.argv[1:])
        args.out.write_text(json.dumps(doc, indent=1))
        return
    t0, results = time.monotonic(), {}
    for seed in args.seeds:
        results[str(seed)] = run_seed(pool, transform, args, seed)
        write_run(args, "fmnist_global_ceiling.py", results, t0)
    print(f"{time.monotonic() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
