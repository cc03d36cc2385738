"""Aggregation time and peak memory for 100 / 1,000 / 10,000 simulated updates of ViT-B-32 adapters.

Shapes: ViT-B-32 (vision width 768, text width 512, 12 layers each), rank 8, q and v on both towers:
- lora: A [8, w] and B [w, 8] per target: 96 tensors, 491,520 floats (1.97 MB float32) per update;
- tri-lora: C [8, 8] per target: 48 tensors, 3,072 floats (12 KB) per update; ce-lora statistics
  for 10 labels in the 512-d embedding space: a histogram [10] and per-label mean and variance [10, 512].

Every case runs in a fresh interpreter so its peak RSS (ru_maxrss) is its own; the table reports
it next to the interpreter's RSS before the case started (numpy imported, the update pool built).
Updates are simulated lazily from a pool of 8 distinct random updates, so the memory measured is the
strategy's own: fedavg streams (one running sum), trimmed-mean holds one tensor of every update at a
time, ce-lora holds the N x P matrix of C and the N x L x 2D statistics and works on row blocks.

    python benchmarks/bench_aggregation.py            # all cases, writes benchmarks/results/aggregation.*
    python benchmarks/bench_aggregation.py --max-n 1000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
RANK, LAYERS, LABELS, EMBED = 8, 12, 10, 512
WIDTHS = {"visual": 768, "text": 512}
POOL = 8


def shapes(kind: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for tower, width in WIDTHS.items():
        prefix = "visual.transformer" if tower == "visual" else "transformer"
        for layer in range(LAYERS):
            for target in ("q", "v"):
                base = f"{prefix}.resblocks.{layer}.attn.{target}_proj"
                if kind == "lora":
                    out[f"{base}.lora_A"] = (RANK, width)
                    out[f"{base}.lora_B"] = (width, RANK)
                else:
                    out[f"{base}.lora_C"] = (RANK, RANK)
    return out


class PoolTensors(Mapping):
    """Update i's tensors: a view of pool entry i % POOL (no per-update memory)."""

    def __init__(self, pool: list[dict[str, np.ndarray]], i: int):
        self.t = pool[i % len(pool)]

    def __getitem__(self, k: str) -> np.ndarray:
        return self.t[k]

    def __iter__(self) -> Iterator[str]:
        return iter(self.t)

    def __len__(self) -> int:
        return len(self.t)


def run_case(strategy: str, kind: str, n: int) -> dict:
    from fedclip.coordinator import strategies
    from fedclip.coordinator.strategies import StrategyOptions, Update
    from fedclip.sdk.wire import STAT_LABEL_HIST, STAT_MEAN, STAT_VAR

    rng = np.random.default_rng(0)
    shp = shapes(kind)
    base = {k: np.zeros(s, np.float32) for k, s in shp.items()}
    pool = [
        {k: rng.standard_normal(s).astype(np.float32) * 0.01 for k, s in shp.items()} for _ in range(POOL)
    ]
    stats = [
        {
            STAT_LABEL_HIST: rng.integers(0, 50, LABELS).astype(np.float32),
            STAT_MEAN: rng.standard_normal((LABELS, EMBED)).astype(np.float32),
            STAT_VAR: rng.uniform(0.5, 2, (LABELS, EMBED)).astype(np.float32),
        }
        for _ in range(POOL)
    ]
    updates = [
        Update(
            f"a{i}",
            int(rng.integers(1, 500)),
            PoolTensors(pool, i),
            base,
            stats[i % POOL] if strategy == "ce-lora" else {},
        )
        for i in range(n)
    ]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    strat = strategies.create(strategy, StrategyOptions(lam=0.5, tau=0.1, trim_fraction=0.1))
    t0 = time.perf_counter()
    result = strat.aggregate(1, updates)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    floats = sum(int(np.prod(s)) for s in shp.values())
    return {
        "strategy": strategy,
        "kind": kind,
        "n": n,
        "seconds": round(seconds, 3),
        "peak_rss_mb": round(peak, 1),
        "rss_before_mb": round(rss_before, 1),
        "tensors": len(shp),
        "floats_per_update": floats,
        "all_updates_mb": round(n * floats * 4 / 2**20, 1),
        "personalized": len(result.per_agent),
    }


CASES = [
    ("fedavg", "lora"),
    ("trimmed-mean", "lora"),
    ("fedavg", "tri-lora"),
    ("trimmed-mean", "tri-lora"),
    ("ce-lora", "tri-lora"),
]


NOTES = """\
How to read this: every case runs in a fresh interpreter; *peak RSS* is that interpreter's maximum
resident memory (ru_maxrss), *RSS before* what it held before aggregating (numpy, the pool of 8
simulated updates). *All updates would be* is what holding every update in RAM would take.

- fedavg streams: one float64 running sum per tensor, so memory stays flat from 100 to 10,000 LoRA
  updates (18.8 GB of updates at 10,000 would not fit; the stream never holds them). In the
  coordinator the updates are read one by one from the blob store (`BlobTensors`).
- trimmed-mean needs every update's value of a coordinate at once; it goes one tensor at a time, so
  peak memory is N x the largest tensor (x2 for the sort), about 0.5 GB at 10,000 LoRA updates.
- ce-lora works on row blocks: nothing N x N is ever held (an N x N float32 matrix alone would be
  400 MB at 10,000). It holds the N x P matrix of C (P = 3,072) and the per-label statistics
  (N x 10 x 1,024 float32), both linear in N. Time grows as N^2 (all pairs), dominated by one
  matrix product per label and row block.
- N is the number of updates in one round (the agents selected for it, K), not the fleet size. At
  10,000 updates per round ce-lora took 7.4 minutes here (in a profile at 1,000, half of the time
  went to the data distances, 2 x N^2 x L x 2D flops of matmuls); with a 10-minute round that is
  tolerable, for more the pairwise step would move to a GPU or restrict j to near neighbours.
- The trimmed-mean rows come from a first full run; the other rows from a rerun
  (`--only ce-lora:tri-lora,fedavg:lora,fedavg:tri-lora`) after memory and speed fixes to them.
- Times were taken on a shared 2-core machine while other jobs ran (see `meta` and each row's
  `load_avg_1min_at_start` in the JSON); on an idle machine expect them to be several times
  shorter, and compare rows with care (fedavg/lora at 10,000 took 131 s in a first, busier run and
  28 s in the run shown). The memory figures do not depend on load.
"""


def write_markdown(data: dict) -> Path:
    meta, rows = data["meta"], data["rows"]
    lines = [
        "# Aggregation time and peak memory (ViT-B-32 shapes, rank 8, q/v on both towers)",
        "",
        "Produced by `python benchmarks/bench_aggregation.py` (raw numbers in `aggregation.json`).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in sorted(meta.items())),
        "",
        "| strategy | adapter | updates | seconds | peak RSS MB | RSS before MB | all updates would be MB |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['strategy']} | {r['kind']} | {r['n']} | {r['error']} | | | |")
        else:
            lines.append(
                f"| {r['strategy']} | {r['kind']} | {r['n']} | {r['seconds']} | {r['peak_rss_mb']} | "
                f"{r['rss_before_mb']} | {r['all_updates_mb']} |"
            )
    lines += [
        "",
        "Per update: lora 96 tensors, 491,520 floats (1.97 MB); tri-lora 48 C tensors, 3,072 floats;",
        "ce-lora statistics: histogram [10], per-label mean and variance [10, 512].",
        "",
        NOTES,
    ]
    out = RESULTS / "aggregation.md"
    out.write_text("\n".join(lines))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-n", type=int, default=10_000)
    ap.add_argument("--case", nargs=3, metavar=("STRATEGY", "KIND", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=1800.0, help="per case, seconds")
    ap.add_argument(
        "--markdown-only", action="store_true", help="rewrite aggregation.md from aggregation.json"
    )
    ap.add_argument(
        "--only", default="", help="comma list of STRATEGY:KIND to rerun, merged into aggregation.json"
    )
    args = ap.parse_args()
    if args.case:  # child mode: one case, JSON on stdout
        print(json.dumps(run_case(args.case[0], args.case[1], int(args.case[2]))))
        return
    if args.markdown_only:
        print(write_markdown(json.loads((RESULTS / "aggregation.json").read_text())))
        return
    only = {tuple(x.split(":")) for x in args.only.split(",") if x}
    old = json.loads((RESULTS / "aggregation.json").read_text())["rows"] if only else []
    rows = []
    for n in (100, 1_000, 10_000):
        if n > args.max_n:
            continue
        for strategy, kind in CASES:
            if only and (strategy, kind) not in only:
                rows += [r for r in old if (r["strategy"], r["kind"], r["n"]) == (strategy, kind, n)]
                continue
            cmd = [sys.executable, __file__, "--case", strategy, kind, str(n)]
            load = os.getloadavg()[0]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rows.append(
                    {"strategy": strategy, "kind": kind, "n": n, "error": f"timeout {args.timeout:.0f}s"}
                )
                continue
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"strategy": strategy, "kind": kind, "n": n, "error": err[:200]})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            rows[-1]["load_avg_1min_at_start"] = round(load, 2)
            print(json.dumps(rows[-1]), flush=True)
    meta = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "rows": rows}
    (RESULTS / "aggregation.json").write_text(json.dumps(data, indent=2) + "\n")
    print(write_markdown(data).read_text())


if __name__ == "__main__":
    main()
