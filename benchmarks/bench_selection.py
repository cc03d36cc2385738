"""Selection at scale: what the coordinator's fleet index and selection cost at 10,000 and 100,000
agents (issue 14, item 5). Pure CPU, no broker; one run, baselines measured in it.

- per status message: the index update (`Fleet.on_status`), the status's decode and validation, and
  the state-dir row the round loop writes for it: alone (`Store.upsert_agents` of one row, one fsynced commit,
  as before) and batched with the group commit (`Store.add_updates(agents=...)`, 256 rows a commit,
  the intake's default batch, as the loop does now);
- per loop iteration: "are enough agents eligible?", by the index (O(1)) against the scan the loop
  did before (`compatible_online`, O(N));
- per round: choosing 1,000 of N (eligible list, participation, choice) for random (the strategy's
  own `select`), fair, and fair with 20 groups (equal and proportional quotas).

Writes `results/selection.json` and the "Selection at scale" section at the end of `results/scale.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _measure as M  # noqa: E402

from fedclip.coordinator import strategies
from fedclip.coordinator.fleet import AgentInfo, Fleet, decode_status
from fedclip.coordinator.selection import choose
from fedclip.coordinator.store import Store
from fedclip.coordinator.store.rows import agent_values
from fedclip.coordinator.strategies.base import StrategyOptions
from fedclip.sdk import messages as m
from fedclip.sdk.wire import Topics

RESULTS = Path(__file__).resolve().parent / "results"
HEADING = "## Selection at scale"
FLEET, BUNDLE, K, GROUPS = "fleet", "b" * 64, 1000, 20
BATCH, BATCHES = 256, 10  # the intake's default batch (`intake_batch`), and how many are timed


def _agent(i: int) -> str:
    return f"cam-{i:06d}"


def _infos(n: int, now: float) -> list[AgentInfo]:
    return [
        AgentInfo(_agent(i), True, (f"site-{i % GROUPS}", "jetson"), BUNDLE, "g-r0", -1, seen_at=now)
        for i in range(n)
    ]


def _median_s(fn, repeat: int) -> float:
    return M.time_steps(fn, warmup=1, steps=repeat)["step_s_median"]


def per_status(n: int, samples: int, store_samples: int) -> dict:
    now = time.time()
    infos = _infos(n, now)
    fleet = Fleet(max_status_age=3600, max_missed=2, group_by="site-")
    t = time.perf_counter()
    for info in infos:
        fleet.on_status(info.id, info, now)
    index_s = time.perf_counter() - t
    topics = Topics(FLEET)
    payloads = [
        m.encode(m.AgentStatus("online", BUNDLE, "g-r0", -1, groups=inf.groups), FLEET, inf.id)
        for inf in infos[:samples]
    ]
    t = time.perf_counter()
    for inf, payload in zip(infos, payloads, strict=False):
        decode_status(topics, inf.id, payload)
    decode_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="bench-selection-") as tmp:
        store = Store(Path(tmp) / "state")
        try:
            t = time.perf_counter()
            for inf in infos[:store_samples]:
                store.upsert_agents(
                    [
                        agent_values(
                            inf.id, True, BUNDLE, "g-r0", -1, {"groups": list(inf.groups)}, time.time()
                        )
                    ]
                )
            store_s = time.perf_counter() - t
            rows = [
                agent_values(inf.id, True, BUNDLE, "g-r0", -1, {"groups": list(inf.groups)}, now)
                for inf in infos[: BATCH * BATCHES]
            ]
            t = time.perf_counter()
            for i in range(0, len(rows), BATCH):
                store.add_updates([], [], rows[i : i + BATCH])
            batch_s = time.perf_counter() - t
        finally:
            store.close()
    return {
        "index_us": round(index_s / n * 1e6, 2),
        "decode_us": round(decode_s / samples * 1e6, 1),
        "store_us": round(store_s / store_samples * 1e6, 1),
        "store_batched_us": round(batch_s / len(rows) * 1e6, 1),
        "samples": {"index": n, "decode": samples, "store": store_samples, "store_batched": len(rows)},
    }


def per_round(n: int, rounds: int) -> dict:
    now = time.time()
    fleet = Fleet(max_status_age=3600, group_by="site-")
    for info in _infos(n, now):
        fleet.on_status(info.id, info, now)
    strategy = strategies.create("fedavg", StrategyOptions(K, "random", 0))
    out: dict = {
        # per loop iteration: the old scan against the index's count
        "scan_us": round(_median_s(lambda: fleet.compatible_online(BUNDLE), 5) * 1e6, 1),
        "count_us": round(_median_s(lambda: fleet.eligible_count(BUNDLE, now), 1001) * 1e6, 3),
    }
    out["count_vs_scan"] = round(out["scan_us"] / max(out["count_us"], 1e-3))

    def fair(groups: bool, quota: str, r: int) -> list[str]:
        pool = fleet.eligible(BUNDLE, now)
        last, turn, grp = fleet.participation(pool)
        got = choose(
            pool, last, grp if groups else None, turn, k=K, round_id=r, seed=0, mode="fair", quota=quota
        )
        fleet.tasked(r, got)
        return got

    cases = {
        "random": lambda r: strategy.select(r, fleet.eligible(BUNDLE, now)),
        "fair": lambda r: fair(False, "", r),
        "fair_groups_equal": lambda r: fair(True, "equal", r),
        "fair_groups_proportional": lambda r: fair(True, "proportional", r),
    }
    for name, fn in cases.items():
        times = []
        for r in range(1, rounds + 1):
            t = time.perf_counter()
            got = fn(r)
            times.append(time.perf_counter() - t)
            assert len(got) == min(K, n)
        out[f"select_{name}_ms"] = round(statistics.median(times) * 1e3, 1)
    return out


def markdown(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    ns = [r["agents"] for r in rows]
    head = "| | " + " | ".join(f"N = {n:,}" for n in ns) + " |\n|---|" + "---:|" * len(ns) + "\n"

    def line(label: str, key: str, fmt: str = "{}") -> str:
        return f"| {label} | " + " | ".join(fmt.format(r[key]) for r in rows) + " |\n"

    return (
        f"{HEADING}\n\n"
        f"Produced by `python benchmarks/bench_selection.py` (raw numbers in `selection.json`): the\n"
        f"coordinator's fleet index and the choice of K = {K:,} agents, without a broker. Machine:\n"
        f"{meta['cpus']} cpus, python {meta['python']}, {meta['date']}, 1-min load {meta['load']}\n"
        f"(a shared machine: wall times inflated).\n\n"
        "Per status message (microseconds):\n\n"
        + head
        + line("fleet index update (`Fleet.on_status`)", "index_us")
        + line("decode + validate the status", "decode_us")
        + line("state-dir row alone (one row, one fsynced commit: before)", "store_us")
        + line(f"state-dir row in the group commit ({BATCH} a commit: now)", "store_batched_us")
        + "\nPer loop iteration, *are enough agents eligible?* (microseconds):\n\n"
        + head
        + line("before: scan every agent (`compatible_online`)", "scan_us")
        + line("now: the index's count (`eligible_count`)", "count_us")
        + line("ratio", "count_vs_scan", "{:,}x")
        + f"\nPer round, choosing {K:,} of N (milliseconds, median of {meta['rounds']} rounds; eligible list,"
        " participation, choice):\n\n"
        + head
        + line("random (the strategy's `select`, today's default)", "select_random_ms")
        + line("fair (least recently selected first)", "select_fair_ms")
        + line(f"fair, {GROUPS} groups, equal quotas", "select_fair_groups_equal_ms")
        + line(f"fair, {GROUPS} groups, proportional quotas", "select_fair_groups_proportional_ms")
        + "\nWhat this says: a status costs the index a tenth or less of what its decode costs. The\n"
        "state-dir row the loop writes for it, alone in its fsynced commit (as before), cost ten to a\n"
        "hundred times more than both: that row was what a connect storm of statuses waited on. In the\n"
        f"group commit ({BATCH} rows a commit, as the loop writes them now) it costs about what the index\n"
        "does. The loop no longer scans the fleet on each iteration: the count is constant-time where the\n"
        "scan grew with N. Choosing K is one sort and one pass over the eligible agents per round (under\n"
        "a second at 100,000 agents even on a loaded machine), most of it the per-agent Python of listing\n"
        "them and reading their last turns.\n"
    )


def write_section(text: str, path: Path) -> None:
    """Replace (or append) this benchmark's section, which is the last one of `path`."""
    old = path.read_text() if path.exists() else ""
    if HEADING in old:
        old = old[: old.index(HEADING)]
    path.write_text(old.rstrip("\n") + "\n\n" + text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", default="10000,100000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--decode-samples", type=int, default=5000)
    ap.add_argument("--store-samples", type=int, default=300)
    ap.add_argument("--markdown-only", action="store_true", help="redo the section from selection.json")
    args = ap.parse_args()
    path = RESULTS / "selection.json"
    if args.markdown_only:
        write_section(markdown(json.loads(path.read_text())), RESULTS / "scale.md")
        return
    rows = []
    for n in (int(x) for x in args.agents.split(",")):
        print(f"N = {n}: per status ...", flush=True)
        row = {"agents": n, **per_status(n, args.decode_samples, args.store_samples)}
        print(f"N = {n}: per round ...", flush=True)
        row.update(per_round(n, args.rounds))
        print(json.dumps(row), flush=True)
        rows.append(row)
    data = {
        "meta": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "load": round(os.getloadavg()[0], 1),
            "rounds": args.rounds,
            "k": K,
        },
        "rows": rows,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    write_section(markdown(data), RESULTS / "scale.md")
    print(f"wrote {path} and the section of {RESULTS / 'scale.md'}")


if __name__ == "__main__":
    main()
