"""CE-LoRA's knobs on FMNIST-FL: lam (data vs parameter distance), tau (temperature), rank.

    python benchmarks/fmnist_sweep.py --pretrained /tmp/fedclip-fmnist-fl/base/fmnist-tiny.pt

Runs `fmnist_fl.py --methods ce-lora` once per setting (same base, partition and budget as the main
benchmark) and writes `results/fmnist_sweep.{json,md}`: mean and worst-agent accuracy and bytes per
round for each setting, next to local-only LoRA on the same seeds. Settings are picked on the same
seeds they are reported on, so the best row is optimistic; the main report keeps the defaults.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_GRID = ["0.5:0.1", "0:0.1", "1:0.1", "0.5:0.03", "0.5:0.3", "0.5:1"]  # lam:tau; 0.5:0.1 = default


def run_one(args, lam: float, tau: float, rank: int, methods: list[str], out: Path) -> dict:
    work = args.work / f"rank{rank}"  # bundles depend on the rank only: shared by the lam/tau runs
    argv = [
        sys.executable, str(HERE / "fmnist_fl.py"), "--methods", *methods, "--seeds", *map(str, args.seeds),
        "--pretrained", args.pretrained, "--lam", str(lam), "--tau", str(tau), "--rank", str(rank),
        "--rounds", str(args.rounds), "--per-agent", str(args.per_agent), "--work", str(work),
        "--out", str(out), "--resume",
    ]  # fmt: skip
    # --resume: a finished (seed, method) is kept, so a rerun only adds what is missing.
    print(f"lam {lam} tau {tau} rank {rank}: {' '.join(methods)}", flush=True)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    doc = json.loads((out / "fmnist_fl.json").read_text())
    row = {"lam": lam, "tau": tau, "rank": rank}
    for method in methods:
        finals, worst, tensors = [], [], []
        for res in doc["results"].values():
            acc = [v[-1] for v in res[method]["accuracy_per_round"].values()]
            finals.append(sum(acc) / len(acc))
            worst.append(min(acc))
            if res[method].get("exchanged_tensor_bytes"):
                tensors.append(res[method]["exchanged_tensor_bytes"])
        row[method] = {
            "mean": sum(finals) / len(finals),
            "worst": sum(worst) / len(worst),
            # what the rank changes on the wire: the exchanged cores per agent and direction
            "tensor_bytes": tensors[0] if tensors else None,
        }
    return row


def markdown(rows: list[dict], args) -> str:
    lines = [
        "# CE-LoRA settings on FMNIST-FL",
        "",
        f"`python benchmarks/fmnist_sweep.py`: seeds {', '.join(map(str, args.seeds))}, "
        f"{args.rounds} rounds, {args.per_agent} images per agent, otherwise the protocol of "
        "`fmnist_fl.md`. Mean over seeds of the agents' mean and worst final accuracy. "
        "The settings were chosen on these same seeds.",
        "",
        "| lam | tau | rank | CE-LoRA mean (%) | CE-LoRA worst (%) | cores / agent | local-only mean (%) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    local = next((r["local-lora"]["mean"] for r in rows if "local-lora" in r), None)
    for r in rows:
        c = r["ce-lora"]
        b = f"{c['tensor_bytes']} B" if c["tensor_bytes"] else "-"
        lo = f"{100 * r['local-lora']['mean']:.1f}" if "local-lora" in r else (
            f"({100 * local:.1f})" if local is not None else "-")  # fmt: skip
        acc = f"{100 * c['mean']:.1f} | {100 * c['worst']:.1f}"
        lines.append(f"| {r['lam']} | {r['tau']} | {r['rank']} | {acc} | {b} | {lo} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True, help="the base weights fmnist_fl.py pretrained")
    ap.add_argument("--grid", nargs="+", default=DEFAULT_GRID, help="lam:tau pairs")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4], help="ranks, each at the first lam:tau")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--per-agent", type=int, default=300)
    ap.add_argument("--work", type=Path, default=Path("/tmp/fedclip-fmnist-sweep"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "fmnist_sweep")
    args = ap.parse_args()
    rows = []
    for i, pair in enumerate(args.grid):
        lam, tau = (float(x) for x in pair.split(":"))
        methods = ["ce-lora", "local-lora"] if i == 0 else ["ce-lora"]
        rows.append(run_one(args, lam, tau, 4, methods, args.work / "runs" / f"lam{lam}-tau{tau}-r4"))
    lam0, tau0 = (float(x) for x in args.grid[0].split(":"))
    for rank in args.ranks:
        if rank != 4:  # local-only LoRA at the same rank: the fair comparison
            out = args.work / "runs" / f"lam{lam0}-tau{tau0}-r{rank}"
            rows.append(run_one(args, lam0, tau0, rank, ["ce-lora", "local-lora"], out))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    args.out.with_suffix(".md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
