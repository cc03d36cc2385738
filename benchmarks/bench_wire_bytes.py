"""Bytes on the wire per round at a real model's width: FedAvg-LoRA vs CE-LoRA (tri-LoRA).

    python benchmarks/bench_wire_bytes.py                    # ViT-B-32, 2 agents, 3 rounds
    python benchmarks/bench_wire_bytes.py --model fedclip-tiny

FMNIST-FL (`fmnist_fl.py`) measures learning quality on `fedclip-tiny`, whose width (d = 64) caps
what tri-LoRA can save: the r x r core against LoRA's A and B is 2d/r per module. This benchmark
measures the bytes alone, through the real coordinator, agent processes and embedded broker, on the
model the FLoRA / CE-LoRA papers use. Random-init weights and a few images per agent: accuracy is
not the point here, so it is not reported. Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fmnist_base import split_fmnist  # noqa: E402

from fedclip.coordinator.demo import (  # noqa: E402
    DemoConfig,
    broker_for,
    read_partition,
    round_costs,
    run_federation,
)
from fedclip.coordinator.procs import ProcessGroup, sigterm_as_interrupt  # noqa: E402

# (strategy, adapter kind, tri-lora init); all adapt q, v of both towers, at --rank except fleet-core,
# run once per --core-rank (its frozen basis: its r x r cores are what travels)
RUNS = (("fedavg", "lora", None), ("ce-lora", "tri-lora", None), ("fleet-core", "tri-lora", "frozen-seed"))
NAMES = {"fedavg": "FedAvg-LoRA", "ce-lora": "CE-LoRA", "fleet-core": "fleet-core"}


def _runs(args) -> list[tuple[str, str, str, str | None, int]]:
    """(run name, strategy, adapter kind, init, rank) in order: fleet-core once per --core-rank."""
    out = []
    for strategy, kind, init in RUNS:
        if strategy != "fleet-core":
            out.append((strategy, strategy, kind, init, args.rank))
        else:
            out += [(f"{strategy}-r{r}", strategy, kind, init, r) for r in args.core_rank]
    return out


def export_bundle(
    model: str, kind: str, labels: list[str], rank: int, out: Path, init: str | None = None
) -> Path:
    from fedclip.exporters.bundle import export_bundle as export
    from fedclip.exporters.config import ExportConfig

    if not (out / "manifest.yaml").is_file():
        # ORT artifacts only: the step format's export takes minutes more and changes no byte on the wire.
        export(
            ExportConfig(
                model=model, out=str(out), adapter=kind, rank=rank, alpha=2.0 * rank,
                labels=tuple(labels), format="ort-training", **({"init": init} if init else {}),
            )
        )  # fmt: skip
    return out


def tensor_bytes(bundle: Path) -> int:
    from fedclip.sdk.manifest import Manifest

    return sum(math.prod(t.shape) * 4 for t in Manifest.load(bundle, verify=False).exchanged)


def run(args) -> dict:
    from fedclip.sdk.partition import write_partition

    work: Path = args.work
    data_dir = work / "data"
    if not (data_dir / "partition.json").is_file():
        _, pool = split_fmnist(0)
        write_partition(
            data_dir, pool, args.agents, 0.1, shift="per-agent", seed=0, max_per_agent=args.per_agent
        )
    labels, agents = read_partition(data_dir)
    out: dict = {
        "model": args.model,
        "agents": args.agents,
        "rounds": args.rounds,
        "rank": args.rank,
        "core_rank": args.core_rank,
        "runs": {},
    }
    for name, strategy, kind, init, rank in _runs(args):
        print(f"{args.model}: exporting {kind} (rank {rank}{', ' + init if init else ''})", flush=True)
        bundle = export_bundle(args.model, kind, labels, rank, work / f"bundle-{strategy}-r{rank}", init)
        cfg = DemoConfig(
            agents=args.agents, rounds=args.rounds, strategy=strategy, model=args.model, rank=rank,
            alpha=2.0 * rank, lr=1e-4, round_timeout=1800, timeout=7200, out=work, run_name="-",
        )  # fmt: skip
        run_dir = work / name
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"{args.model}: {strategy}, {args.agents} agents x {args.rounds} rounds", flush=True)
        t0 = time.monotonic()
        with (
            sigterm_as_interrupt(),
            broker_for(cfg, run_dir / "secrets", run_dir / "coordinator", agents) as broker,
            ProcessGroup(log_dir=run_dir / "logs") as procs,
        ):
            fleet = run_federation(cfg, procs, broker, bundle, data_dir, agents, run_dir, console=None)
            procs.stop_all()
        costs = round_costs(fleet.coordinator_state)
        out["runs"][name] = {
            "strategy": strategy,
            "adapter": kind,
            "rank": rank,
            "exchanged_tensor_bytes_per_agent": tensor_bytes(bundle),
            "rounds": {str(r): c for r, c in sorted(costs.items())},
            "seconds": time.monotonic() - t0,
        }
        print(json.dumps(out["runs"][name]["rounds"]), flush=True)
    out["platform"] = f"{platform.machine()} Python {platform.python_version()}"
    return out


def _kb(n: float) -> str:
    return f"{n / 1024:.1f} KB" if n < 2**20 else f"{n / 2**20:.2f} MB"


def _total(run: dict, rounds: list[str]) -> int:
    return sum(run["rounds"][r]["uplink_bytes"] + run["rounds"][r]["downlink_bytes"] for r in rounds)


def markdown(res: dict) -> str:
    fed = res["runs"]["fedavg"]
    cores = [k for k in res["runs"] if k != "fedavg"]
    rank = lambda k: res["runs"][k].get("rank", res["rank"])  # noqa: E731
    name = lambda k: NAMES[res["runs"][k].get("strategy", k)]  # noqa: E731
    title = ", ".join(f"{name(k)} (r {rank(k)})" for k in cores)
    lines = [
        f"# Bytes on the wire: FedAvg-LoRA (r {res['rank']}) vs {title} on {res['model']}",
        "",
        f"{res['agents']} agents, {res['rounds']} rounds, q, v of both towers; real coordinator,",
        "agent processes and embedded broker (random-init weights, a few Fashion-MNIST images per agent:",
        "bytes only). fleet-core's tri-LoRA has a frozen basis shared by every agent (`--init frozen-seed`)",
        "of rank r; only its r x r cores train and travel, as CE-LoRA's.",
        "Uplink = update payloads as received (tensors, statistics, envelope); downlink = task payloads.",
        "The core strategies' agents send their data statistics only when the coordinator does not hold",
        "them for their current data (here: round 1), as float16.",
        "",
        "| round | FedAvg-LoRA up | FedAvg-LoRA down | "
        + " | ".join(f"{name(k)} r {rank(k)} up | down | ratio (up+down)" for k in cores)
        + " |",
        "|---:|" + "---:|" * (2 + 3 * len(cores)),
    ]
    rounds = [r for r in sorted(fed["rounds"], key=int) if all(r in res["runs"][k]["rounds"] for k in cores)]
    for r in rounds:
        f = fed["rounds"][r]
        cells = [_kb(f["uplink_bytes"]), _kb(f["downlink_bytes"])]
        for k in cores:
            c = res["runs"][k]["rounds"][r]
            ratio = _total(fed, [r]) / _total(res["runs"][k], [r])
            cells += [_kb(c["uplink_bytes"]), _kb(c["downlink_bytes"]), f"{ratio:.0f}x"]
        lines.append(f"| {r} | " + " | ".join(cells) + " |")
    tot_f = _total(fed, rounds)
    cells = ["", ""]
    for k in cores:
        tot_c = _total(res["runs"][k], rounds)
        cells += ["", "", f"**{tot_f / tot_c:.0f}x** ({_kb(tot_f)} vs {_kb(tot_c)})"]
    lines.append("| all | " + " | ".join(cells) + " |")
    lora_t = fed["exchanged_tensor_bytes_per_agent"]
    tensors = ", ".join(
        f"{name(k)} r {rank(k)} cores {_kb(res['runs'][k]['exchanged_tensor_bytes_per_agent'])} "
        f"({lora_t / res['runs'][k]['exchanged_tensor_bytes_per_agent']:.0f}x)"
        for k in cores
    )
    lines += [
        "",
        f"Adapter tensors alone, per agent and direction: LoRA r {res['rank']} {_kb(lora_t)}, {tensors}.",
        "",
        f"{res['platform']}; `python benchmarks/bench_wire_bytes.py --model {res['model']} "
        f"--core-rank {' '.join(str(r) for r in res.get('core_rank', []))}`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--per-agent", type=int, default=64)
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--core-rank", type=int, nargs="+", default=[6, 7], help="fleet-core's basis ranks")
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedclip-wire-bytes"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "wire_bytes")
    args = ap.parse_args()
    args.work = args.work / args.model
    args.work.mkdir(parents=True, exist_ok=True)
    res = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    args.out.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
