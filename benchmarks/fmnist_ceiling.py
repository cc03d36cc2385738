"""Issue 13: how much own accuracy pooling can buy at all, and balanced-softmax training as a method.

    nice -n 10 python benchmarks/fmnist_ceiling.py --regime clustered --agents 15 --per-agent 32 \\
        --beta 0.5 --out /tmp/ceiling/clustered32.json
    python benchmarks/fmnist_ceiling.py --report /tmp/ceiling/*.json   # -> results/fmnist_ceiling.*

The fleets, model, adapter and training are `fmnist_sim.py`'s (LoRA r 4 on q, v of both towers,
AdamW, batch 32, lr 0.005, 5 rounds x 3 local epochs, local-only 15 epochs). Two questions:

1. **Ceiling.** Federated training can at best give an agent what training on the pooled images would:
   - `group-pooled`: each agent's adapter trained centrally on the images of every agent of its camera
     group: with local-only's number of optimizer steps (what pooling the data alone buys), and for
     15 or 30 epochs (5x and 10x local-only's steps in a group of 5);
   - `all-pooled`: on every agent's images (all cameras), 10 epochs;
   - `all-pooled-bsm`: the same with each image's loss logit-adjusted by its agent's label prior
     (balanced softmax), scored with the agent's own prior added at inference (x0, x0.5, x1).
   If a pooled oracle's own accuracy is not local-only + 5, no federated method of these adapters
   reaches the issue's target in that regime, whatever it averages.
2. **Balanced softmax (logit adjustment) as the fleet's training loss** (tried, benchmark-only): each
   agent trains on `CE(logits + log pi_i, y)` with `pi_i` its label histogram (+0.1 per label), so the
   shared adapter learns the classes without the agent's label prior, and the prior is added back at
   inference, `logits + a log pi_i` (pi_i with +1 per label), for a in {0, 0.5, 1}. Aggregation is the
   coordinator's own `fedavg` or `fleet-lora` strategy.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fmnist_sim as S  # noqa: E402
from fmnist_base import BASE_STEPS  # noqa: E402
from fmnist_regimes import make_fleet  # noqa: E402

from fedclip.coordinator import strategies  # noqa: E402
from fedclip.coordinator.strategies import StrategyOptions  # noqa: E402
from fedclip.sdk import label_prior  # noqa: E402

PRIOR_SCALES = (0.0, 0.5, 1.0)
# the product's pseudo-counts (train loss, inference): these runs measure what the agents do
TRAIN_PSEUDO, EVAL_PSEUDO = label_prior.TRAIN_PSEUDO, label_prior.INFER_PSEUDO


def log_prior(y: torch.Tensor, pseudo: float, labels: int = 10) -> torch.Tensor:
    counts = np.bincount(y.numpy(), minlength=labels)
    return torch.from_numpy(label_prior.log_prior(counts, pseudo))


def scores(model: S.Model, fleet, states: dict, scales=(0.0,)) -> dict:
    """{scale: (own, all-class)}: means over agents, the agent's prior x scale added to the logits."""
    out: dict = {s: ([], []) for s in scales}
    for a in fleet.agents:
        model.load(states[a.name])
        lo, la = model.logits(a.own_x), model.logits(a.all_x)
        lp = log_prior(a.train_y, EVAL_PSEUDO)
        for s in scales:
            out[s][0].append(S._hits(lo + s * lp, a.own_y))
            out[s][1].append(S._hits(la + s * lp, a.all_y))
    return {str(s): (float(np.mean(o)), float(np.mean(al))) for s, (o, al) in out.items()}


def pooled(model: S.Model, fleet, members, epochs, lr: float, bsm: bool = False) -> dict:
    """Each agent's adapter trained centrally on the images of `members(agent)`, for `epochs`
    epochs (an int, or a function of the pooled image count)."""
    states, cache = {}, {}
    for i, a in enumerate(fleet.agents):
        mem = members(a)
        key = tuple(b.name for b in mem)
        if key not in cache:
            n = sum(len(b.train_y) for b in mem)
            x = torch.cat([b.train_x for b in mem])
            y = torch.cat([b.train_y for b in mem])
            bias = None
            if bsm:
                bias = torch.cat([log_prior(b.train_y, TRAIN_PSEUDO).expand(len(b.train_y), -1) for b in mem])
            model.load(model.init)
            model.train(x, y, epochs(n) if callable(epochs) else epochs, lr, 5000 + i, bias)
            cache[key] = model.state()
        states[a.name] = cache[key]
    return states


def federated(
    model: S.Model, fleet, strategy: str, args, seed: int, bsm: bool, each_round=None
) -> tuple[dict, dict]:
    """(each agent's final adapter, the global adapter) after `args.rounds` rounds of `strategy`;
    `each_round(glob)` is called with the global adapter after every round."""
    strat = strategies.create(strategy, StrategyOptions(lam=1.0, tau=args.tau, seed=seed))
    # The statistics of the base model, as fmnist_sim computes them (this model may still hold an
    # adapter another run trained); only for strategies that use them.
    model.load(model.init)
    stats = {a.name: model.stats(a) for a in fleet.agents} if strat.stats else {}
    glob = {n: model.init[n] for n in model.exchanged}
    personal: dict = {}
    local = {a.name: dict(model.init) for a in fleet.agents}
    biases = None
    if bsm:
        biases = {a.name: log_prior(a.train_y, TRAIN_PSEUDO).expand(len(a.train_y), -1) for a in fleet.agents}
    for r in range(1, args.rounds + 1):
        glob, personal = S.fleet_round(
            model, strat, fleet, r, args.local_epochs, args.lr, seed, local, personal, glob, stats, biases
        )
        if each_round is not None:
            each_round(glob)
    return {a.name: {**local[a.name], **personal.get(a.name, glob)} for a in fleet.agents}, glob


def run_seed(pool, transform, args, seed: int) -> dict:
    fleet = make_fleet(pool, transform, args.regime, args.agents, args.per_agent, seed, args.beta)
    model = S.Model(args.pretrained, S.CLASSES, "lora", "ce-lora", 4, seed)
    epochs = args.rounds * args.local_epochs  # local-only's
    res: dict = {}

    def log(name: str, got: dict) -> None:
        res[name] = got
        shown = " ".join(f"x{k} {o * 100:.1f}/{al * 100:.1f}" for k, (o, al) in got.items())
        print(f"  s{seed} {name}: {shown}", flush=True)

    log("zero-shot", scores(model, fleet, {a.name: model.init for a in fleet.agents}))
    log("local-only", scores(model, fleet, pooled(model, fleet, lambda a: [a], epochs, args.lr)))
    group = lambda a: [b for b in fleet.agents if b.group == a.group]  # noqa: E731
    everyone = lambda a: fleet.agents  # noqa: E731
    # As many optimizer steps as local-only takes (batch 32): the data pooled, not the compute.
    per = -(-args.per_agent // 32) * epochs
    same = lambda n: max(1, round(per / -(-n // 32)))  # noqa: E731
    log("group-pooled, local-only's steps", scores(model, fleet, pooled(model, fleet, group, same, args.lr)))
    for n in (epochs, 2 * epochs):
        log(f"group-pooled {n} ep", scores(model, fleet, pooled(model, fleet, group, n, args.lr)))
    log("all-pooled 10 ep", scores(model, fleet, pooled(model, fleet, everyone, 10, args.lr)))
    bsm_states = pooled(model, fleet, everyone, 10, args.lr, bsm=True)
    log("all-pooled-bsm 10 ep", scores(model, fleet, bsm_states, PRIOR_SCALES))
    for strategy in ("fedavg", "fleet-lora"):
        for bsm in (False, True):
            states, glob = federated(model, fleet, strategy, args, seed, bsm)
            name = f"{strategy}{'-bsm' if bsm else ''}"
            log(name, scores(model, fleet, states, PRIOR_SCALES if bsm else (0.0,)))
            model.load({**model.init, **glob})
            res[name + " global"] = model.accuracy(fleet.global_x, fleet.global_y)
    return res


def setup(args):
    """(client pool, image transform) on the cached pretrained base, which `args.pretrained` names."""
    torch.set_num_threads(1)
    from fmnist_base import cached_base, split_fmnist

    from fedclip.exporters.models import build_base_model
    from fedclip.sdk.preprocess import ImageTransform

    args.pretrained = cached_base(args.base_cache, steps=args.base_steps)["weights"]
    _, pool = split_fmnist(5000)
    S.CLASSES = pool.classes
    return pool, ImageTransform(build_base_model("fedclip-tiny", args.pretrained).preprocess)


def fleet_args(ap: argparse.ArgumentParser) -> None:
    """The fleet and training flags this script and `fmnist_coldstart.py` share (same defaults)."""
    ap.add_argument("--agents", type=int, default=15)
    ap.add_argument("--per-agent", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--base-cache", type=Path, default=Path("/tmp/fedclip-fmnist-base"))
    # 300: the benchmark's base; fewer steps, a base that knows less of the domain (fmnist_base_room)
    ap.add_argument("--base-steps", type=int, default=BASE_STEPS, help="the base's pretraining steps")


def report_instead(ap: argparse.ArgumentParser, args, module: str, *extra) -> bool:
    """With `--report FILES`: `module.write_report(FILES, results/, *extra)`, and True (nothing to
    run); else `--out` must be there (the scripts that run fleets and report them share this)."""
    if args.report:
        import importlib

        importlib.import_module(module).write_report(args.report, HERE / "results", *extra)
        return True
    if args.out is None:
        ap.error("--out is required (or --report)")
    return False


def main() -> None:
    run_main(__doc__ or "", "fmnist_ceiling", "fmnist_ceiling_report", run_seed, "clustered")


def run_main(doc: str, script: str, report: str, seed_fn, regime: str) -> None:
    """The command line these fleet scripts share: `--regime` and `fleet_args`, then `--out` (one
    `seed_fn(pool, transform, args, seed)` per seed, written after each) or `--report` (`report`'s
    `write_report`)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--regime", choices=("today", "scarce", "clustered"), default=regime)
    fleet_args(ap)
    ap.add_argument("--out", type=Path, help="the JSON file for the results")
    ap.add_argument("--report", type=Path, nargs="*", help=f"write results/{script}.* from these JSONs")
    args = ap.parse_args()
    if report_instead(ap, args, report, doc):
        return
    pool, transform = setup(args)
    t0, results = time.monotonic(), {}
    for seed in args.seeds:
        results[str(seed)] = seed_fn(pool, transform, args, seed)
        write_run(args, f"{script}.py", results, t0)


def write_run(args, script: str, results: dict, t0: float) -> None:
    """The results so far, with the protocol and the command, to `args.out` (after every seed)."""
    doc = {"protocol": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:]),
           "results": results, "seconds": time.monotonic() - t0}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
