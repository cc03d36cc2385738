"""Issue 13's cold start through the real path: agents that join a trained fleet-lora fleet.

    nice -n 15 python benchmarks/fmnist_newcomers_real.py --agents 6 --per-agent 32 --newcomers 3 \
        --rounds 5 --local-epochs 3 --seeds 0 --out /tmp/fl-newcomers/clustered6.json

The clustered fleet of `fmnist_regimes.draw_fleet` (camera groups), written as image folders, with
`--newcomers` agents of 16 labelled images drawn like the members of their group. The members train
`--rounds` rounds of fleet-lora with balanced softmax (`fedclip-coord serve`, one `fedclip-agent
start` per agent, the embedded broker, provisioned). Then the newcomers start and the coordinator
runs two more rounds: in the first a newcomer's task is statistics only and the round gives it the
members' adapters weighted by its statistics (docs/aggregation.md, "Newcomers"); in the second it
trains from them. Each newcomer is scored on its own split and its all-class set with
- `join`: the adapter it got on joining (its ledger's `a-<id>-r<R+1>`, its label prior stamped),
- `join, one round`: after its first local round (its final rollout),
- `global`: the fleet's global adapter of round R with its prior (what a newcomer got before),
- `local-only`: `fedclip-agent train` on its 16 images alone, rounds x local epochs (plain CE, as
  the regimes report's local-only; and with balanced softmax, its prior added back), and zero-shot.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmnist_ceiling import fleet_args  # noqa: E402
from fmnist_fl import run_local  # noqa: E402
from fmnist_regimes import write_fleet  # noqa: E402

from fedclip.coordinator.demo import DemoConfig, export, finish_eval, spawn_eval  # noqa: E402
from fedclip.coordinator.demo.federation import deliver_final, run_federation  # noqa: E402
from fedclip.coordinator.demo.launch import broker_for  # noqa: E402
from fedclip.coordinator.procs import ProcessGroup  # noqa: E402
from fedclip.coordinator.store import Store  # noqa: E402
from fedclip.sdk.adapters import adapter_from_bytes, save_adapter  # noqa: E402
from fedclip.sdk.all_class import ALL_SPLIT  # noqa: E402
from fedclip.sdk.ledger import Ledger, read_record  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _federate(cfg: DemoConfig, bundle: Path, data_dir: Path, members: list[str], newcomers: list[str],
              work: Path) -> None:  # fmt: skip
    """`cfg.rounds` rounds of the members, then two more with the newcomers joined."""
    everyone = [*members, *newcomers]
    with (
        broker_for(cfg, work / "secrets", work / "coordinator", everyone) as broker,
        ProcessGroup(log_dir=work / "logs") as procs,
    ):
        run_federation(cfg, procs, broker, bundle, data_dir, members, work)
        joined = replace(cfg, rounds=cfg.rounds + 2)
        run = run_federation(joined, procs, broker, bundle, data_dir, everyone, work, running=members)
        deliver_final(joined, procs, broker, run)
        procs.stop_all()


def _adapters(work: Path, newcomer: str, rounds: int) -> dict[str, Path]:
    """The newcomer's adapters to score (see the module doc), as files with its label prior."""
    state = work / "agents" / newcomer
    ledger = Ledger.read(state)
    by_version = {e.version: e.file for e in ledger.entries}
    out = {"join": by_version[f"a-{newcomer}-r{rounds + 1}"]}
    final = ledger.after_rounds(rounds + 2)
    out["join, one round"] = final[max(final)]
    prior = tuple(read_record(state)["label_prior"])
    with Store(work / "coordinator", readonly=True) as s:
        row = s.version(f"g-r{rounds}")
        assert row is not None
        tensors, meta = adapter_from_bytes(s.blobs.get(row.blob), row.version)
    out["global"] = save_adapter(
        work / "scored" / f"{newcomer}-global.safetensors", tensors, replace(meta, label_prior=prior)
    )
    return out


def _score(bundle: Path, data_dir: Path, newcomer: str, adapter: Path | None, work: Path) -> list[float]:
    """[own, all-class] accuracy of `adapter` for `newcomer`."""
    with ProcessGroup(log_dir=work / "logs-eval") as procs:
        cache = work / "eval-cache" / newcomer
        own = spawn_eval(
            procs, f"own-{newcomer}", bundle, data_dir / newcomer / "test", adapter, cache / "own"
        )
        every = spawn_eval(
            procs, f"all-{newcomer}", bundle, data_dir / newcomer / ALL_SPLIT, adapter, cache / "all"
        )
        return [float(finish_eval(own)["accuracy"]), float(finish_eval(every)["accuracy"])]


def run_seed(args, pool, pretrained: str, seed: int) -> dict:
    sw = args.work / f"clustered-{args.agents}x{args.per_agent}+{args.newcomers}-seed-{seed}"
    data_dir = sw / "data"
    if not (data_dir / "partition.json").is_file():
        shutil.rmtree(data_dir, ignore_errors=True)
        print(f"seed {seed}: writing the fleet", flush=True)
        write_fleet(data_dir, pool, "clustered", args.agents, args.per_agent, seed, args.beta,
                    newcomers=args.newcomers)  # fmt: skip
    summary = json.loads((data_dir / "partition.json").read_text())
    labels, members, newcomers = summary["labels"], summary["agents"], summary["newcomers"]
    cfg = DemoConfig(
        agents=len(members), rounds=args.rounds, local_epochs=args.local_epochs, lr=args.lr,
        rank=args.rank, alpha=2.0 * args.rank, pretrained=pretrained, seed=seed, lam=1.0, tau=args.tau,
        strategy="fleet-lora", loss="balanced-softmax", towers="vision,text", round_timeout=900,
        timeout=3600, out=sw, run_name="-",
    )  # fmt: skip
    bundle = sw / "bundle-lora"
    if not (bundle / "manifest.yaml").is_file():
        shutil.rmtree(bundle, ignore_errors=True)
        with ProcessGroup(log_dir=sw / "logs") as procs:
            export(cfg, procs, labels, bundle)
    fed, local, local_bsm = sw / "fleet-lora-bsm", sw / "local-lora", sw / "local-lora-bsm"
    for d in (fed, local, local_bsm):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.monotonic()
    print(f"seed {seed}: {len(members)} members, then {len(newcomers)} newcomers join", flush=True)
    _federate(cfg, bundle, data_dir, members, newcomers, fed)
    res: dict = {"federation_seconds": time.monotonic() - t0, "groups": summary["groups"], "agents": {}}
    loc = run_local(cfg, bundle, data_dir, newcomers, local)
    run_local(cfg, bundle, data_dir, newcomers, local_bsm, loss="balanced-softmax")
    for a in newcomers:
        row = {
            name: _score(bundle, data_dir, a, path, fed)
            for name, path in _adapters(fed, a, args.rounds).items()
        }
        row["local-only"] = _score(bundle, data_dir, a, local / "adapters" / f"{a}.safetensors", local)
        bsm = local_bsm / "adapters" / f"{a}.safetensors"
        row["local-only, balanced softmax"] = _score(bundle, data_dir, a, bsm, local_bsm)
        row["zero-shot"] = _score(bundle, data_dir, a, None, local)
        assert abs(row["local-only"][0] - loc["accuracy_per_round"][a][-1]) < 1e-9  # the same eval
        res["agents"][a] = row
        print(f"  {a}: " + ", ".join(f"{k} {v[0]:.3f}/{v[1]:.3f}" for k, v in row.items()), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    fleet_args(ap)  # the in-process cold-start runs' fleet and training flags
    ap.set_defaults(agents=6, seeds=[0])  # the real-path regimes runs' fleet size
    ap.add_argument("--newcomers", type=int, default=3)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedclip-fmnist-newcomers"))
    ap.add_argument("--out", type=Path, help="JSON file for the results")
    ap.add_argument("--report", type=Path, nargs="+", help="only write the report of these JSON runs")
    args = ap.parse_args()
    if args.report:
        from fmnist_newcomers_report import write_report

        write_report(args.report, RESULTS)
        return
    if args.out is None:
        ap.error("--out is required (or --report)")

    from fmnist_base import cached_base, split_fmnist

    pretrained = cached_base(args.base_cache, steps=args.base_steps)["weights"]
    _, pool = split_fmnist(5000)
    doc: dict = {
        "protocol": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": "python benchmarks/fmnist_newcomers_real.py " + " ".join(sys.argv[1:]),
        "results": {},
    }
    for seed in args.seeds:
        doc["results"][str(seed)] = run_seed(args, pool, pretrained, seed)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
