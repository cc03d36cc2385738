"""Issue 13: does a larger adapter move the own target's ceiling?

    nice -n 10 python benchmarks/fmnist_capacity.py --regime scarce --agents 10 --per-agent 32 \\
        --beta 0.1 --base-steps 40 --out /tmp/capacity/scarce32_base40.json
    python benchmarks/fmnist_capacity.py --report /tmp/capacity/*.json   # -> results/fmnist_capacity.*

`fmnist_ceiling.md` bounds the own gain of fedclip's default adapter (LoRA r 4 on q, v of both
towers). The exporter can also put adapters on k, o and the MLPs (`fedclip-coord export --targets
q,k,v,o,mlp --rank R`). With more capacity the fleet's adapter may use the fleet's images more while
the device alone, with the same adapter and 25 images, may only overfit more. For each adapter below,
in-process (`fmnist_sim.py`'s fleets and training, as `fmnist_ceiling.py`; alpha 2 x rank, lr 0.005):
- `local-only`: the agent alone, plain CE, rounds x local epochs (15);
- `fleet-lora-bsm`: the coordinator's `fleet-lora` strategy over balanced softmax, 5 rounds x 3
  epochs, the agent's label prior x1 added at inference (the product's personalized method);
- `all-pooled-bsm`: every agent's images pooled, balanced softmax, 10 epochs, prior x1 (the oracle).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fmnist_sim as S  # noqa: E402
from fmnist_ceiling import federated, pooled, run_main, scores  # noqa: E402
from fmnist_regimes import make_fleet  # noqa: E402

ALL = ("q", "k", "v", "o", "mlp")
# name -> (targets, rank); the first is fedclip's default (fmnist_ceiling's adapter)
ADAPTERS = {"q,v r4": (("q", "v"), 4), "q,v r16": (("q", "v"), 16), "all r4": (ALL, 4), "all r16": (ALL, 16)}


def run_seed(pool, transform, args, seed: int) -> dict:
    fleet = make_fleet(pool, transform, args.regime, args.agents, args.per_agent, seed, args.beta)
    epochs = args.rounds * args.local_epochs  # local-only's, as fmnist_ceiling's
    res: dict = {}
    for name, (targets, rank) in ADAPTERS.items():
        model = S.Model(args.pretrained, S.CLASSES, "lora", "ce-lora", rank, seed, targets=targets)
        got = {
            "local-only": scores(model, fleet, pooled(model, fleet, lambda a: [a], epochs, args.lr)),
            "fleet-lora-bsm": scores(model, fleet, federated(model, fleet, "fleet-lora", args, seed, True)[0],
                                     (1.0,)),
            "all-pooled-bsm": scores(model, fleet, pooled(model, fleet, lambda a: fleet.agents, 10, args.lr,
                                                          bsm=True), (1.0,)),
        }  # fmt: skip
        res[name] = {
            "params": model.exchanged_size(),
            **{row: next(iter(by_scale.values())) for row, by_scale in got.items()},
        }
        shown = " ".join(f"{row} {o * 100:.1f}/{al * 100:.1f}" for row, (o, al) in got_pairs(res[name]))
        print(f"  s{seed} {name} ({res[name]['params']:,} params): {shown}", flush=True)
    return res


def got_pairs(row: dict) -> list[tuple[str, tuple[float, float]]]:
    """(method, (own, all-class)) of one adapter's results, without its numbers (parameter count, weights)."""
    return [(k, v) for k, v in row.items() if isinstance(v, (list, tuple))]


def main() -> None:
    run_main(__doc__ or "", "fmnist_capacity", "fmnist_capacity_report", run_seed, "scarce")


if __name__ == "__main__":
    main()
