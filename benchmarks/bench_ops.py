"""What one Prometheus scrape and one dashboard poll cost as the fleet grows.

For fleets of 100, 1,000 and 10,000 agents that each sent an update in every one of `--rounds` rounds,
a state dir is filled through the coordinator's own schema (the store makes it; the rows go in with
one bulk insert per table, because a round loop would take hours at 10,000 agents), then the time of
`/metrics` (the collector) and of `/api/fleet` (the dashboard's document) is measured in this process,
median of `--repeat` after one warm-up. The baseline, measured in the same run on the same dir, is
reading the whole `metrics` table once through `Store.metrics()` (the store's own public read), so the
ratios say how a scrape compares with one plain pass over the biggest table.

    python benchmarks/bench_ops.py [--sizes 100 1000 10000] [--rounds 10] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from fedclip.coordinator.fleet_view import FleetView
from fedclip.coordinator.prom import registry_for, render
from fedclip.coordinator.store import DB_NAME, Store

RESULTS = Path(__file__).parent / "results"
METRICS = ("accuracy_before", "accuracy_after", "loss_before", "loss_after")


def fill(state: Path, agents: int, rounds: int) -> dict[str, int]:
    """A state dir as `rounds` rounds of `agents` updates each would leave it (fedavg, no blobs)."""
    with Store(state) as s:  # the schema and meta, exactly as the coordinator makes them
        for k, v in (("fleet", "bench"), ("bundle_id", "b" * 64), ("strategy", "fedavg")):
            s.set_meta(k, v)
    ids = [f"agent-{i:05d}" for i in range(agents)]
    now = time.time()
    conn = sqlite3.connect(state / DB_NAME)
    with conn:
        conn.executemany(
            "INSERT INTO agents VALUES(?, 1, ?, ?, ?, ?, ?)",
            [(a, "b" * 64, f"g-r{rounds}", rounds, json.dumps({"groups": [f"site{i % 10}"]}), now)
             for i, a in enumerate(ids)],
        )  # fmt: skip
        for r in range(1, rounds + 1):
            t0 = now - (rounds - r + 1) * 60
            conn.execute(
                "INSERT INTO rounds VALUES(?, 'aggregated', 'fedavg', ?, ?, 0, ?, NULL, ?)",
                (r, t0, t0 + 600, t0 + 30, f"g-r{r}"),
            )
            conn.executemany(
                "INSERT INTO selections VALUES(?, ?, ?, ?)", [(r, a, f"g-r{r - 1}", f"{r:064x}") for a in ids]
            )
            conn.executemany(
                "INSERT INTO updates VALUES(?, ?, ?, ?, 100, '{}', 1.0, 0, ?, 20000)",
                [(r, a, f"{r}{a}", f"{r}{a}", t0 + 10) for a in ids],
            )
            conn.executemany(
                "INSERT INTO metrics VALUES(?, ?, ?, ?)",
                [(r, a, m, 0.5) for a in [*ids, ""] for m in METRICS],
            )
            conn.execute(
                "INSERT INTO versions VALUES(?, ?, ?, 'fedavg', 'global', '', ?, '{}', ?)",
                (f"g-r{r}", f"g-r{r - 1}", r, f"{r:064x}", t0 + 30),
            )
        conn.executemany(
            "INSERT INTO rejections(at, topic, agent, round, reason) VALUES(?, ?, ?, ?, ?)",
            [(now, f"agents/{a}/update", a, 1, f"late: round aggregated ({a})") for a in ids[: agents // 10]],
        )
    conn.close()
    return {"updates": agents * rounds, "metric_rows": (agents + 1) * rounds * len(METRICS)}


def timed(fn, repeat: int) -> float:
    fn()  # warm-up: the page cache and the view's caches, as for every scrape after the first
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        with tempfile.TemporaryDirectory(prefix="fedclip-bench-ops-") as tmp:
            state = Path(tmp) / "state"
            counts = fill(state, n, args.rounds)
            with Store(state, readonly=True) as s:
                baseline = timed(s.metrics, args.repeat)
            with FleetView(state) as view:
                reg = registry_for(view)
                scrape = timed(lambda reg=reg: render(reg), args.repeat)
                doc = timed(lambda view=view: json.dumps(view.document()), args.repeat)
                size = len(render(reg)), len(json.dumps(view.document()))
        rows.append({"agents": n, "rounds": args.rounds, **counts, "baseline_s": baseline,
                     "metrics_s": scrape, "api_fleet_s": doc, "metrics_bytes": size[0],
                     "api_fleet_bytes": size[1], "metrics_ratio": scrape / baseline,
                     "api_fleet_ratio": doc / baseline})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    report = {"load_average": os.getloadavg(), "repeat": args.repeat, "rows": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ops.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "# Cost of a `/metrics` scrape and a dashboard poll",
        "",
        f"`python benchmarks/bench_ops.py --rounds {args.rounds} --repeat {args.repeat}`; every agent "
        "sent an update in every round. Median seconds after one warm-up, in one process. Baseline: one "
        "pass over the `metrics` table through `Store.metrics()`, same dir, same run. Load average "
        + ", ".join(f"{x:.1f}" for x in report["load_average"])
        + " (2 shared cores).",
        "",
        "| agents | updates | metric rows | baseline (s) | /metrics (s) | ratio | /api/fleet (s) | ratio "
        "| /metrics bytes | /api/fleet bytes |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['agents']:,} | {r['updates']:,} | {r['metric_rows']:,} | {r['baseline_s']:.3f} | "
            f"{r['metrics_s']:.3f} | {r['metrics_ratio']:.2f}x | {r['api_fleet_s']:.3f} | "
            f"{r['api_fleet_ratio']:.2f}x | {r['metrics_bytes']:,} | {r['api_fleet_bytes']:,} |"
        )
    (RESULTS / "ops.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
