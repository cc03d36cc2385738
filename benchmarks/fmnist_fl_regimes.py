"""FMNIST-FL regimes (issue 13) through the real path: coordinator, agent processes, MQTT broker.

    nice -n 15 python benchmarks/fmnist_fl_regimes.py --regime scarce --agents 6 --per-agent 32 \
        --local-epochs 3 --seeds 0 --out /tmp/fl-regimes/scarce32.json

The fleets are `fmnist_regimes.draw_fleet`'s (the in-process simulator's, image for image) written
as image folders (`write_fleet`): `<agent>/train`, `<agent>/test` (own split) and `<agent>/all` (the
balanced all-class set under the agent's shift). Methods run as in `fmnist_fl.py`: zero-shot and
local-only LoRA by `fedclip-agent eval/train`, the federated ones by `fedclip-coord serve` with one
`fedclip-agent start` process per agent over the embedded broker. Every agent's final adapter is then
scored on its own split (every round) and on its all-class set (the last round) by
`fedclip-agent eval`. The FedAvg methods' global model (the adapter every agent installs after a
round) is scored on the balanced, unshifted `global/` set after every `--global-every` rounds and the
last (`global_per_round`; FLoRA's protocol, with `--no-shift` as in `fmnist_base_room.py`).
`fmnist_regimes_report.py --real` folds the JSON into the report.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmnist_base import BASE_STEPS  # noqa: E402
from fmnist_fl import FEDERATED, run_federated, run_local, run_zero_shot  # noqa: E402
from fmnist_regimes import GLOBAL_DIR, write_fleet  # noqa: E402

from fedclip.coordinator.config import CoordConfig  # noqa: E402
from fedclip.coordinator.demo import DemoConfig, export, finish_eval  # noqa: E402
from fedclip.coordinator.demo.evaluation import eval_argv  # noqa: E402
from fedclip.coordinator.procs import ProcessGroup  # noqa: E402
from fedclip.sdk.adapters import load_adapter  # noqa: E402
from fedclip.sdk.all_class import ALL_SPLIT  # noqa: E402
from fedclip.sdk.errors import StateError  # noqa: E402
from fedclip.sdk.ledger import Ledger  # noqa: E402
from fedclip.sdk.wire import tensors_digest  # noqa: E402

METHODS = (
    "zero-shot", "local-lora", "fedavg-lora-both", "fleet-lora", "fleet-lora-bsm", "fleet-core-r6",
    "fleet-core-r6-bsm", "fleet-core-r7", "fleet-core-r7-bsm", "fedavg-lora-both-bsm",
    "fedavg-lora-both-bsm-personal",
)  # fmt: skip
CORE = "fleet-core-r"  # fleet-core-r<rank>[-bsm]: run on their own bundle (`core_setup`)
# "<federated method>-personal": that method's final adapters tuned on each agent's training split
# with the proximal term (`fedclip-agent train --prox-mu`, what an agent with `personal:` runs on a
# rollout; docs/aggregation.md, "Personal tuning"); the federated method must have run on the seed
PERSONAL = "-personal"


def core_setup(method: str, cfg: DemoConfig, args, sw: Path, labels: list[str]) -> tuple[DemoConfig, Path]:
    """fleet-core's settings and bundle: tri-LoRA over a frozen basis of the rank the method's name
    says (seeded, shared by every agent), only the cores train, at `--core-lr-scale` x LoRA's lr."""
    r = int(method.removeprefix(CORE).split("-")[0])
    cfg = replace(cfg, strategy="fleet-core", rank=r, alpha=2.0 * r, lr=args.lr * args.core_lr_scale)
    bundle = sw / f"bundle-fleet-core-r{r}"
    if not (bundle / "manifest.yaml").is_file():
        shutil.rmtree(bundle, ignore_errors=True)
        with ProcessGroup(log_dir=sw / "logs") as procs:
            export(cfg, procs, labels, bundle)
    return cfg, bundle


def final_adapters(method: str, work: Path, agents: list[str], rounds: int) -> dict[str, Path | None]:
    """Each agent's adapter after the last round (the final rollout; None: the bundle's initial one)."""
    if method == "zero-shot":
        return dict.fromkeys(agents)
    if method == "local-lora" or method.endswith(PERSONAL):
        return {a: work / "adapters" / f"{a}.safetensors" for a in agents}
    out: dict[str, Path | None] = {}
    for a in agents:
        try:
            after = Ledger.read(work / "agents" / a).after_rounds(rounds)
        except StateError:
            after = {}
        out[a] = after[max(after)] if after else None
    return out


Evals = dict[str, tuple[Path, Path | None]]  # name -> (data folder, adapter; None: the bundle's)


def _evals(bundle: Path, jobs: Evals, work: Path, logs: str, *options: str) -> dict[str, float]:
    """name -> accuracy of `fedclip-agent eval [options]` on each job, two evals at a time."""
    acc: dict[str, float] = {}
    with ProcessGroup(log_dir=work / f"logs-{logs}") as procs:
        pending = list(jobs.items())
        running = []
        while pending or running:
            while pending and len(running) < 2:
                name, (data, adapter) = pending.pop(0)
                cache = work / f"{logs}-embeddings" / name
                argv = [*eval_argv(bundle, data, adapter, cache), *options]
                running.append((name, procs.spawn(f"{logs}-{name}", argv, capture=True)))
            name, child = running.pop(0)
            acc[name] = float(finish_eval(child)["accuracy"])
    return acc


def all_class(bundle: Path, data_dir: Path, adapters: dict[str, Path | None], work: Path) -> dict[str, float]:
    """Each agent's accuracy on its all-class set."""
    return _evals(bundle, {a: (data_dir / a / ALL_SPLIT, p) for a, p in adapters.items()}, work, "all")


def global_adapters(work: Path, agents: list[str], rounds: int, every: int) -> dict[int, dict]:
    """after_round -> the FedAvg global adapter after that round (every `every`-th and the last):
    the tensors most agents installed, and how many did (every agent installs the same aggregate, so
    a count under the fleet means an agent missed that round's rollout). Tensors, not files: under
    balanced softmax each agent's copy carries its own label prior in the metadata."""
    out: dict[int, dict] = {}
    ledgers = {}
    for a in agents:
        try:
            ledgers[a] = Ledger.read(work / "agents" / a).after_rounds(rounds)
        except StateError:
            ledgers[a] = {}
    for r in sorted({*range(every, rounds + 1, every), rounds}):
        files = [ledger[r] for ledger in ledgers.values() if r in ledger]
        if not files:
            continue
        digests = [tensors_digest(load_adapter(p)[0]) for p in files]
        by_digest = dict(zip(digests, files, strict=True))
        digest, n = Counter(digests).most_common(1)[0]
        out[r] = {"adapter": by_digest[digest], "agents": n}
    return out


def global_per_round(method: str, bundle: Path, data_dir: Path, work: Path, agents: list[str],
                     rounds: int, every: int) -> dict[str, dict]:  # fmt: skip
    """The global model's accuracy on `global/` by round (round 0: the base, zero-shot's only one),
    without a label prior (`--prior-weight 0`): the balanced set is scored as `fmnist_sim.py` does."""
    found = {0: {"adapter": None, "agents": len(agents)}}
    if method != "zero-shot":
        found |= global_adapters(work, agents, rounds, every)
    jobs = {str(r): (data_dir / GLOBAL_DIR, f["adapter"]) for r, f in found.items()}
    acc = _evals(bundle, jobs, work, "global", "--prior-weight", "0")
    return {str(r): {"accuracy": acc[str(r)], "agents": f["agents"]} for r, f in found.items()}


def has_global(method: str) -> bool:
    """Methods whose agents all install one aggregate (FedAvg), and zero-shot (the base)."""
    return method == "zero-shot" or (method.startswith("fedavg-") and not method.endswith(PERSONAL))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regime", choices=("today", "scarce", "clustered"), default="scarce")
    ap.add_argument("--agents", type=int, default=6)
    ap.add_argument("--per-agent", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--lam", type=float, default=None)
    ap.add_argument("--tau", type=float, default=None)
    ap.add_argument("--core-lr-scale", type=float, default=30.0, help="fleet-core's lr over LoRA's")
    ap.add_argument("--personal-mu", type=float, default=1.5, help="the -personal methods' proximal weight")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--no-shift", action="store_true", help="every agent the unshifted camera (FLoRA)")
    ap.add_argument("--global-every", type=int, default=5, help="score the global model every N rounds")
    ap.add_argument("--base-cache", type=Path, default=Path("/tmp/fedclip-fmnist-base"))
    ap.add_argument("--base-steps", type=int, default=BASE_STEPS, help="the base's pretraining steps")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedclip-fmnist-fl-regimes"))
    ap.add_argument("--out", type=Path, required=True, help="JSON file for the results")
    args = ap.parse_args()

    from fmnist_base import cached_base, split_fmnist

    pretrained = cached_base(args.base_cache, steps=args.base_steps)["weights"]
    _, pool = split_fmnist(5000)
    doc = {
        # reset_optimizer: what the coordinator asks of the agents each round (runs before session 15
        # lack it: the agents kept their AdamW moments across rounds)
        "protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        | {"reset_optimizer": CoordConfig.reset_optimizer},
        "command": "python benchmarks/fmnist_fl_regimes.py " + " ".join(sys.argv[1:]),
        "results": {},
    }
    t_start = time.monotonic()
    for seed in args.seeds:
        shift = "-noshift" if args.no_shift else ""
        sw = args.work / f"{args.regime}-{args.agents}x{args.per_agent}-beta{args.beta}{shift}-seed-{seed}"
        data_dir = sw / "data"
        # fleets written before the global set was are written again (the same images)
        if not (data_dir / "partition.json").is_file() or not (data_dir / GLOBAL_DIR).is_dir():
            shutil.rmtree(data_dir, ignore_errors=True)
            print(f"seed {seed}: writing the {args.regime} fleet", flush=True)
            write_fleet(data_dir, pool, args.regime, args.agents, args.per_agent, seed, args.beta,
                        cameras=not args.no_shift)  # fmt: skip
        summary = json.loads((data_dir / "partition.json").read_text())
        labels, agents = summary["labels"], summary["agents"]
        cfg = DemoConfig(
            agents=len(agents), rounds=args.rounds, local_epochs=args.local_epochs, lr=args.lr,
            rank=args.rank, alpha=2.0 * args.rank, pretrained=pretrained, seed=seed, lam=args.lam,
            tau=args.tau, strategy="fedavg", round_timeout=900, timeout=3600, out=sw, run_name="-",
        )  # fmt: skip
        bundle = sw / "bundle-lora"
        if not (bundle / "manifest.yaml").is_file():
            shutil.rmtree(bundle, ignore_errors=True)
            print(f"seed {seed}: exporting", flush=True)
            with ProcessGroup(log_dir=sw / "logs") as procs:
                export(cfg, procs, labels, bundle)
        seed_res: dict = {"groups": summary.get("groups", {})}
        doc["results"][str(seed)] = seed_res
        for method in args.methods:
            mw = sw / method
            shutil.rmtree(mw, ignore_errors=True)
            print(f"seed {seed}: {method}", flush=True)
            t0 = time.monotonic()
            m_cfg, m_bundle = replace(cfg, towers="vision,text"), bundle
            if method.startswith(CORE):
                m_cfg, m_bundle = core_setup(method, m_cfg, args, sw, labels)
            if method == "zero-shot":
                res = run_zero_shot(bundle, data_dir, agents, mw)
            elif method == "local-lora":
                res = run_local(cfg, bundle, data_dir, agents, mw)
            elif method.endswith(PERSONAL):
                fleet = method.removesuffix(PERSONAL)
                start = final_adapters(fleet, sw / fleet, agents, args.rounds)
                if not all(p is not None and p.is_file() for p in start.values()):
                    raise SystemExit(f"{method}: run {fleet} on seed {seed} first (its final adapters)")
                res = run_local(cfg, bundle, data_dir, agents, mw, start=start, prox_mu=args.personal_mu,
                                name=method)  # fmt: skip
            else:
                res = run_federated(method, m_cfg, m_bundle, data_dir, agents, mw)
            res["all_class"] = all_class(
                m_bundle, data_dir, final_adapters(method, mw, agents, args.rounds), mw
            )
            if has_global(method):
                res["global_per_round"] = global_per_round(
                    method, m_bundle, data_dir, mw, agents, args.rounds, args.global_every
                )
            res["method_seconds"] = time.monotonic() - t0
            seed_res[method] = res
            own = [v[-1] for v in res["accuracy_per_round"].values()]
            alls = list(res["all_class"].values())
            glob = res.get("global_per_round", {}).get(str(args.rounds if method != "zero-shot" else 0))
            print(f"  own {sum(own) / len(own):.3f} all-class {sum(alls) / len(alls):.3f} "
                  + (f"global {glob['accuracy']:.3f} " if glob else "")
                  + f"({res['method_seconds']:.0f}s)", flush=True)  # fmt: skip
            doc["seconds"] = time.monotonic() - t_start
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    assert {m for m in METHODS if not m.endswith(PERSONAL)} - {"zero-shot", "local-lora"} <= set(FEDERATED)
    main()
