"""Issue 13: a shared part and a personal part of one adapter (FedPer / FedRep-style splits).

    nice -n 10 python benchmarks/fmnist_split.py --regime scarce --agents 10 --per-agent 32 \\
        --beta 0.1 --base-steps 40 --out /tmp/split/scarce32_base40.json
    python benchmarks/fmnist_split.py --report /tmp/split/*.json   # -> results/fmnist_split.*

`fmnist_ceiling.md` bounds what pooling buys ONE adapter per camera group. In the scarce fleets
every device has its own camera, so that one adapter must serve every camera. A split keeps part of
the adapter on the device, never sent, and mixes only the rest (FedPer, Arivazhagan et al. 2019,
keeps the head personal; FedRep, Collins et al. 2021, the same split). Such a method is outside the
pooled bound. fedclip's default adapter (LoRA r 4 on q, v of both towers, 2 blocks a tower in
fedclip-tiny) split four ways, in-process (`fmnist_sim.py`'s fleets and training, as
`fmnist_ceiling.py`; 5 rounds x 3 epochs, lr 0.005):
- `whole adapter mixed`: every A and B exchanged (today's fleet-lora);
- `vision personal`: the image tower's adapter stays on the device (its camera), the text tower's
  (the class prompts) is mixed;
- `text personal`: the class prompts' adapter stays (CLIP's classifier head is its text tower:
  FedPer's split), the image tower's is mixed;
- `vision block 0 personal`: the first image block's adapter stays (the layer nearest the pixels),
  everything else is mixed.
Each split is run with the coordinator's `fleet-lora` and `fedavg` strategies over balanced softmax,
the agent's label prior x1 added at inference (the product's personalized loss), against
`local-only`: the whole adapter trained alone, plain CE, rounds x local epochs (15).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fmnist_sim as S  # noqa: E402
from fmnist_capacity import got_pairs  # noqa: E402
from fmnist_ceiling import federated, pooled, run_main, scores  # noqa: E402
from fmnist_regimes import make_fleet  # noqa: E402

from fedclip.coordinator import strategies  # noqa: E402
from fedclip.coordinator.strategies import StrategyOptions, Update  # noqa: E402

VISION, VISION_0 = "visual.", "visual.transformer.resblocks.0."
# name -> which adapter tensors stay on the device (the rest is exchanged and mixed)
SPLITS = {
    "whole adapter mixed": lambda n: False,
    "vision personal": lambda n: n.startswith(VISION),
    "text personal": lambda n: not n.startswith(VISION),
    "vision block 0 personal": lambda n: n.startswith(VISION_0),
}
STRATEGIES = ("fleet-lora", "fedavg")


def run_seed(pool, transform, args, seed: int) -> dict:
    fleet = make_fleet(pool, transform, args.regime, args.agents, args.per_agent, seed, args.beta)
    model = S.Model(args.pretrained, S.CLASSES, "lora", "ce-lora", 4, seed)
    every = list(model.exchanged)
    epochs = args.rounds * args.local_epochs  # local-only's, as fmnist_ceiling's
    alone = scores(model, fleet, pooled(model, fleet, lambda a: [a], epochs, args.lr))
    res: dict = {}
    mix = mixing_weights(model, fleet, args.tau, seed)
    for name, personal in SPLITS.items():
        # `fleet_round` sends `model.exchanged` and keeps the rest of each agent's adapter as it trained it
        model.exchanged = [n for n in every if not personal(n)]
        row: dict = {"params": model.exchanged_size(), "local-only": alone["0.0"], **mix}
        for strategy in STRATEGIES:
            states = federated(model, fleet, strategy, args, seed, True)[0]
            row[f"{strategy}-bsm"] = scores(model, fleet, states, (1.0,))["1.0"]
        res[name] = row
        shown = " ".join(f"{k} {o * 100:.1f}/{al * 100:.1f}" for k, (o, al) in got_pairs(row))
        print(f"  s{seed} {name} ({row['params']:,} exchanged): {shown}", flush=True)
    model.exchanged = every
    return res


def mixing_weights(model: S.Model, fleet, tau: float, seed: int) -> dict:
    """What fleet-lora keeps of each agent's own update, and gives its camera group (means over
    agents): the coordinator's own weights, read by aggregating one-hot updates (`x_i = e_i`, so
    agent i's output is its row of weights), from the base model's statistics as `federated`'s."""
    strat = strategies.create("fleet-lora", StrategyOptions(lam=1.0, tau=tau, seed=seed))
    model.load(model.init)
    n, eye = len(fleet.agents), np.eye(len(fleet.agents), dtype=np.float32)
    updates = [Update(a.name, len(a.train_y), {"x": eye[i]}, {"x": np.zeros(n, np.float32)}, model.stats(a))
               for i, a in enumerate(fleet.agents)]  # fmt: skip
    per_agent = strat.aggregate(1, updates).per_agent
    w = np.stack([per_agent[a.name]["x"] for a in fleet.agents])
    group = np.array([[a.group == b.group for b in fleet.agents] for a in fleet.agents])
    return {"fleet-lora self weight": float(np.mean(np.diag(w))),
            "fleet-lora group weight": float(np.mean((w * group).sum(axis=1)))}  # fmt: skip


def main() -> None:
    run_main(__doc__ or "", "fmnist_split", "fmnist_split_report", run_seed, "scarce")


if __name__ == "__main__":
    main()
