"""Intake at fleet rate: signed updates in over MQTT, validated, durable and acknowledged, per second.

End to end (`burst`): N+1 provisioned simulated agents (`_sim_setup`: startup kits, mosquitto on the
fleet's generated config, the real `fedclip-coord serve`, ce-lora, every agent selected) receive
their round-1 task and prepare their signed update; then N of them publish at once and the clock
runs until the coordinator has stored the N-th (its `updates` rows: validated incl. signature,
blob and row durable; the batch's PUBACKs follow its commit). The last agent holds its update back,
so the round stays open and no aggregation runs inside the measurement. The same burst runs with
`intake_batch: 1` (every update flushed and acknowledged alone: the path before group commit) and
with group commit, in the same run, alternating. Reported: updates per second, and the
coordinator's CPU seconds per 1,000 updates (from /proc, the less noisy figure on a shared
machine), mosquitto's and the publisher's too, and the load average.

In process (`store`): the storage layer alone on this disk: a batch of blobs with `Blobs.put` each
(temp file, fsync, rename, folder fsync) against `Blobs.put_many` (the same steps, fsyncs issued
together), and rows with one transaction each against one transaction per batch.

    python benchmarks/bench_intake.py --bundle /tmp/bundle --updates 2000 --kits /tmp/intake-kits
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sim_setup  # noqa: E402
from _sim_watch import proc_sample  # noqa: E402

from fedclip.sdk.manifest import Manifest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def _stored(state: Path) -> tuple[int, float]:
    """(updates stored, when the last was stored) from the coordinator's database, read-only."""
    db = state / "coordinator.sqlite"
    if not db.exists():
        return 0, 0.0
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        n, last = con.execute("SELECT COUNT(*), MAX(received_at) FROM updates").fetchone()
        return int(n), float(last or 0.0)
    except sqlite3.Error:
        return 0, 0.0
    finally:
        con.close()


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    out = {k: s[0] for k, pid in pids.items() if (s := proc_sample(pid)) is not None}
    out["publisher"] = time.process_time()
    return out


def burst(
    bundle: Path,
    updates: int,
    batch: int,
    kits: Path,
    timeout: float,
    say=print,
    profile: Path | None = None,
    workers: int | None = None,
) -> dict:
    """One end-to-end burst of `updates` signed updates with `intake_batch: batch` and
    `intake_workers: workers` (None: the default); with `profile`, a py-spy record of the
    coordinator's round loop during the burst (collapsed stacks, every thread) goes there."""
    n = updates + 1  # the last agent holds its update: the round stays open, nothing aggregates
    settings = {
        "strategy": "ce-lora",
        "rounds": 1,
        "clients_per_round": 0,
        "selection": "all",
        "min_updates": n,
        "round_timeout": timeout * 4,
        "intake_batch": batch,
    }
    if workers is not None:
        settings["intake_workers"] = workers
    sim = _sim_setup.start(bundle, n, settings, kits=kits, hold=True, say=say)
    deadline = time.time() + timeout
    row: dict = {"updates": updates, "intake_batch": batch, "intake_workers": workers}
    try:
        fleet = sim.fleet
        _sim_setup.wait(sim, lambda: "connected" in sim.watch.events, deadline, "the coordinator")
        fleet.connect_all()
        _sim_setup.wait(sim, lambda: fleet.c.tasks.get(1, 0) >= n, deadline, "every task")
        _sim_setup.wait(sim, lambda: len(fleet.held) >= n, deadline, "every update prepared")
        load0 = os.getloadavg()[0]
        spy = _profiler(sim.pids["coordinator"], profile, say) if profile else None
        cpu0, t0 = _cpu(sim.pids), time.time()
        fleet.release(keep=1)
        stored = [0, 0.0]

        def all_stored() -> bool:
            stored[:] = _stored(sim.state)
            return stored[0] >= updates

        last_poll = [0.0]

        def done() -> bool:  # the database is read every 50 ms, the agents driven in between
            if time.monotonic() - last_poll[0] < 0.05:
                return False
            last_poll[0] = time.monotonic()
            return all_stored()

        _sim_setup.wait(sim, done, deadline, f"{updates} updates stored")
        cpu1 = _cpu(sim.pids)
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes what it sampled so far and exits
            spy.wait(30)
        seconds = stored[1] - t0
        row.update(
            {
                "seconds": round(seconds, 3),
                "updates_per_s": round(updates / seconds, 1),
                "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)],
            }
        )
        for k in cpu1:
            row[f"{k}_cpu_s_per_1000"] = round((cpu1[k] - cpu0.get(k, cpu1[k])) / updates * 1000, 3)
        con = sqlite3.connect(f"file:{sim.state / 'coordinator.sqlite'}?mode=ro", uri=True)
        try:
            row["rejected"] = con.execute("SELECT COUNT(*) FROM rejections").fetchone()[0]
            row["update_bytes"] = round(con.execute("SELECT AVG(wire_bytes) FROM updates").fetchone()[0])
        finally:
            con.close()
        row["coordinator_errors"] = sim.watch.errors[:3]
    except (TimeoutError, RuntimeError) as e:
        row["error"] = str(e)
        say(f"  FAILED: {e}")
    finally:
        _sim_setup.stop(sim)
        if sim.tmp is not None:
            sim.tmp.cleanup()
    return row


def _profiler(pid: int, out: Path, say) -> subprocess.Popen:
    """py-spy (`pip install py-spy`; not a dependency) sampling `pid` until interrupted."""
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("--profile needs py-spy on PATH (pip install py-spy)")
    cmd = [
        spy,
        "record",
        "--pid",
        str(pid),
        "--subprocesses",
        "--format",
        "raw",
        "--threads",
        "--rate",
        "250",
        "-o",
        str(out),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the burst starts
    say(f"  py-spy on the coordinator ({pid}) -> {out}")
    return proc


def store_layer(batch: int = 256, rounds: int = 3, blob_bytes: int = 3700) -> dict:
    """`Blobs.put` x batch vs `Blobs.put_many`, and one transaction per row vs per batch (ms per
    update, best of `rounds`), in a temp dir on this disk."""
    from fedclip.coordinator.store import NewUpdate, Store

    out: dict = {"batch": batch, "blob_bytes": blob_bytes}
    with tempfile.TemporaryDirectory(prefix="bench-intake-", dir=os.environ.get("TMPDIR")) as tmp:
        store = Store(Path(tmp) / "state")
        try:
            times: dict[str, list[float]] = {k: [] for k in ("put", "put_many", "row_each", "rows_batch")}
            for r in range(rounds):
                blobs = [os.urandom(blob_bytes) for _ in range(2 * batch)]
                t = time.perf_counter()
                for b in blobs[:batch]:
                    store.blobs.put(b)
                times["put"].append(time.perf_counter() - t)
                t = time.perf_counter()
                store.blobs.put_many(blobs[batch:])
                times["put_many"].append(time.perf_counter() - t)
                rows = [NewUpdate(r, f"a{i}", "s", "b", 1, {}, 0.0, False) for i in range(2 * batch)]
                t = time.perf_counter()
                for row in rows[:batch]:
                    store.add_updates([row])
                times["row_each"].append(time.perf_counter() - t)
                t = time.perf_counter()
                store.add_updates(rows[batch:])
                times["rows_batch"].append(time.perf_counter() - t)
        finally:
            store.close()
    for k, v in times.items():
        out[f"{k}_ms_per_update"] = round(min(v) / batch * 1000, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a tri-lora bundle")
    ap.add_argument("--updates", type=int, default=2000)
    ap.add_argument("--batches", default="1,256", help="intake_batch values to compare, in order")
    ap.add_argument("--workers", default="", help="intake_workers values to compare (default: the default)")
    ap.add_argument("--repeat", type=int, default=1, help="alternating runs of each")
    ap.add_argument("--kits", type=Path, default=Path(tempfile.gettempdir()) / "fedclip-intake-kits")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--profile", type=Path, help="py-spy the coordinator in each burst: DIR/<n>.txt")
    args = ap.parse_args()
    say = print
    result: dict = {"store": store_layer(), "bursts": []}
    say(json.dumps(result["store"]))
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    workers = [int(x) for x in args.workers.split(",")] if args.workers else [None]
    for r in range(args.repeat):
        for b, w in ((int(x), w) for x in args.batches.split(",") for w in workers):
            say(f"burst of {args.updates} updates, intake_batch {b}, intake_workers {w}")
            spy = args.profile / f"coordinator-{r}-{b}-{w}.txt" if args.profile else None
            row = burst(args.bundle, args.updates, b, args.kits, args.timeout, lambda *a: None, spy, w)
            say(json.dumps(row))
            result["bursts"].append(row)
    if args.no_report:
        return
    import _sim_report

    path = RESULTS / "scale.json"
    data = json.loads(path.read_text()) if path.exists() else {"rows": [], "meta": {}}
    result["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpus": os.cpu_count(),
        "bundle": Manifest.load(args.bundle).bundle_id[:12],
    }
    data["intake"] = result
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(_sim_report.write_report(data))


if __name__ == "__main__":
    main()
