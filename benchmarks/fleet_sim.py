"""Fleet simulator: N simulated agents on N real MQTT connections against the real coordinator.

One process, one thread, one `selectors` loop over N paho clients (paho's external-loop API:
`loop_read` / `loop_write` driven by the socket callbacks), so 10,000 connections cost 10,000
sockets, not 10,000 threads. Each simulated agent does what `fedclip-agent start` does on the wire,
without ONNX Runtime:

- has a startup kit made by `Provisioner` (its own Ed25519 key and broker login, enrolled in the
  coordinator's registry), signs every status and update with its key and logs in with its password,
  so the coordinator runs provisioned: only signed messages of enrolled agents count (`--unsigned`:
  an unprovisioned fleet, as before; kits are made once into `--kits DIR` and reused);
- connects with a fixed client id, a persistent session and a retained `offline` last will;
- subscribes to its task topic and publishes a valid retained `online` status (bundle id, samples);
- answers every task with a valid update: the task's starting tensors plus a prepared delta (one of
  64 directions, so updates differ), the `stats/*` tensors the task asks for (label histogram as
  float32, per-label mean and variance as float16, as the agent sends them) and a `data_digest`;
  when the task's `stats_digest` is that digest, only the histogram travels (statistics sent once).

`run()` starts a real mosquitto on the fleet's generated config (logins and topic ACL; or uses
`--broker` URLs, spread over the agents, or a local NATS cluster with `--nats`), the real
`fedclip-coord serve` as a subprocess (ce-lora, every agent selected, quorum = N, 2 rounds: the
second round's tasks carry each agent's personalized adapter), drives the fleet until the
coordinator has aggregated both rounds, and reports phase times, peak RSS and CPU of coordinator
and broker, and bytes.

    python benchmarks/fleet_sim.py --bundle /tmp/bundle --agents 1000,10000 --kits /tmp/sim-kits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sim_setup  # noqa: E402
from _sim_agents import Prepared, SimFleet  # noqa: E402
from _sim_report import plot, write_report  # noqa: E402

from fedclip.sdk.manifest import Manifest  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
__all__ = ["Prepared", "SimFleet", "run"]


# ---- one run --------------------------------------------------------------------------------------
def run(
    bundle: Path,
    n: int,
    *,
    broker_urls: list[str] | None = None,
    coordinator_url: str | None = None,
    rounds: int = 2,
    timeout: float = 3600.0,
    workdir: Path | None = None,
    strategy: str = "ce-lora",
    nats: int = 0,
    provisioned: bool = True,
    kits: Path | None = None,
    intake_batch: int | None = None,
    connect_rate: float = 0.0,
    say=print,
) -> dict:
    """One simulated fleet of `n` agents through `rounds` rounds; returns the report row.

    Brokers: `broker_urls` if given, else a NATS cluster of `nats` nodes (agents spread over the
    nodes, the coordinator on node 0) if `nats` > 0, else a mosquitto started here. Provisioned (the
    default): the agents sign with their kits' keys (made in `kits`, a cache folder, when given) and
    the coordinator counts only signed messages of enrolled agents."""
    settings = {
        "strategy": strategy,
        "rounds": rounds,
        "clients_per_round": 0,
        "selection": "all",
        "min_updates": n,
        "round_timeout": timeout,
    }
    if intake_batch is not None:
        settings["intake_batch"] = intake_batch
    sim = _sim_setup.start(
        bundle,
        n,
        settings,
        broker_urls=broker_urls,
        coordinator_url=coordinator_url,
        nats=nats,
        provisioned=provisioned,
        kits=kits,
        workdir=workdir,
        say=say,
    )
    fleet, watch, mon = sim.fleet, sim.watch, sim.mon
    sim_cpu0 = time.process_time()
    deadline = time.time() + timeout
    row: dict = {
        "agents": n,
        "rounds": rounds,
        "strategy": strategy,
        "brokers": len(sim.broker_urls),
        "signed": provisioned,
    }
    t: dict[str, float] = {}

    def wait(cond, what: str) -> None:
        _sim_setup.wait(sim, cond, deadline, what)

    try:
        # The coordinator first: its start-up (imports, state dir) is not a phase of the round.
        wait(lambda: "connected" in watch.events, "the coordinator to connect")
        t["start"] = time.time()
        say(f"[{n}] connecting {n} agents")
        fleet.connect_all(
            rate=connect_rate,
            progress=lambda k: say(f"[{n}]   {k} connections opened") if k % 2000 == 0 else None,
        )
        wait(lambda: fleet.c.status_acked >= n, "online statuses acknowledged")
        t["status_done"] = time.time()
        say(f"[{n}] all {n} online ({t['status_done'] - t['start']:.1f}s); waiting for round 1")
        for r in range(1, rounds + 1):
            wait(lambda r=r: fleet.c.tasks.get(r, 0) >= n, f"round {r} tasks")
            say(f"[{n}] round {r}: {n} tasks received, updates going out")
            wait(lambda r=r: fleet.c.updates_acked.get(r, 0) >= n, f"round {r} sent")
            wait(lambda r=r: f"aggregated_r{r}" in watch.events, f"round {r} aggregated")
            say(f"[{n}] round {r}: aggregated in {watch.aggregate_seconds.get(r, 0):.2f}s")
        sim.coord.wait(timeout=max(10.0, deadline - time.time()))
        t["end"] = time.time()
    except (TimeoutError, RuntimeError) as e:
        row["error"] = str(e)
        say(f"[{n}] FAILED: {e}")
    finally:
        sim_cpu = time.process_time() - sim_cpu0
        disconnects = _sim_setup.stop(sim)
    pids, c, state = sim.pids, fleet.c, sim.state
    row.update(_phases(t, watch.events, c, watch, mon, rounds, _intake_ends(state)))
    row.update(
        {
            "coordinator_peak_rss_mb": mon.peak_rss("coordinator"),
            "coordinator_cpu_s": mon.cpu_total("coordinator"),
            # a cluster: all nodes together (phases show node 0's, the coordinator's node)
            "broker_peak_rss_mb": round(sum(mon.peak_rss(k) for k in pids if k.startswith("broker")), 1)
            or None,
            "broker_cpu_s": round(sum(mon.cpu_total(k) for k in pids if k.startswith("broker")), 2) or None,
            "broker": f"nats x{nats}"
            if sim.cluster is not None
            else "given"
            if sim.broker is None
            else "mosquitto",
            "sim_cpu_s": round(sim_cpu, 2),
            "sim_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "bytes_agents_sent": c.bytes_out,
            "bytes_agents_received": c.bytes_in,
            "disconnects": disconnects,
            "subscriptions_refused": c.refused_subs,
            "coordinator_errors": watch.errors[:5],
            "load_avg_1min_end": round(os.getloadavg()[0], 2),
        }
    )
    row["update_bytes_mean"] = _update_bytes(state, rounds)
    if sim.tmp is not None and workdir is None:
        sim.tmp.cleanup()  # a caller's `workdir` (the state dir in it) stays for inspection
    return row


def _intake_ends(state: Path) -> dict[int, float]:
    """When the coordinator stored each round's last update (`updates.received_at`)."""
    import sqlite3

    db = state / "coordinator.sqlite"
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return dict(con.execute("SELECT round, MAX(received_at) FROM updates GROUP BY round").fetchall())
    except sqlite3.Error:
        return {}
    finally:
        con.close()


def _phases(t, ev, c, watch, mon, rounds, intake) -> dict:
    """Phase durations (s) and the coordinator's CPU in each, from sim events and its log."""
    out: dict = {"phases": []}

    def phase(name: str, a: float | None, b: float | None) -> None:
        if a is None or b is None:
            return
        out["phases"].append(
            {
                "phase": name,
                "seconds": round(b - a, 2),
                "coordinator_cpu_s": mon.cpu_between("coordinator", a, b),
                "broker_cpu_s": mon.cpu_between("broker", a, b) if "broker" in mon.pids else None,
            }
        )

    phase("connect + status", t.get("start"), t.get("status_done"))
    prev_end = t.get("status_done")
    for r in range(1, rounds + 1):
        started = ev.get(f"started_r{r}")
        label = "selection" if r == 1 else "close + selection"
        phase(f"r{r} {label}", prev_end, started)
        tasks_name = "tasks out" if r == 1 else "tasks out (personalized adapters)"
        phase(f"r{r} {tasks_name}", started, c.last.get(f"task_r{r}"))
        agg_end = ev.get(f"aggregated_r{r}")
        intake_end = intake.get(r)
        phase(f"r{r} updates in (validated, stored, acked)", c.first.get(f"update_sent_r{r}"), intake_end)
        phase(f"r{r} aggregation + commit", intake_end, agg_end)
        if r in watch.aggregate_seconds:
            out[f"aggregate_seconds_r{r}"] = watch.aggregate_seconds[r]
        prev_end = agg_end
    return out


def _update_bytes(state: Path, rounds: int) -> dict:
    import sqlite3

    db = state / "coordinator.sqlite"
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT round, AVG(wire_bytes) FROM updates GROUP BY round").fetchall()
    except sqlite3.Error:
        return {}
    finally:
        con.close()
    return {str(r): round(b or 0, 1) for r, b in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, help="a tri-lora bundle (shapes of its manifest)")
    ap.add_argument("--agents", default="1000", help="comma list of N")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--broker", default="", help="comma list of broker URLs (default: start mosquitto)")
    ap.add_argument("--nats", type=int, default=0, help="start a NATS cluster of this many nodes instead")
    ap.add_argument(
        "--connect-rate", type=float, default=0.0, help="agents connecting per second (0: at once)"
    )
    ap.add_argument("--timeout", type=float, default=3600.0, help="per N, seconds")
    ap.add_argument(
        "--kits", type=Path, help="folder where the agents' startup kits are made once and reused"
    )
    ap.add_argument("--unsigned", action="store_true", help="an unprovisioned fleet (nothing signed)")
    ap.add_argument("--no-report", action="store_true", help="print rows, write nothing")
    ap.add_argument(
        "--markdown-only", action="store_true", help="redo scale.md and scale.png from scale.json"
    )
    args = ap.parse_args()
    if args.markdown_only:
        data = json.loads((RESULTS / "scale.json").read_text())
        print(write_report(data), plot(data))
        return
    if args.bundle is None:
        ap.error("--bundle is required")
    urls = [u for u in args.broker.split(",") if u] or None
    rows = []
    for n in (int(x) for x in args.agents.split(",")):
        row = run(
            args.bundle,
            n,
            broker_urls=urls,
            rounds=args.rounds,
            timeout=args.timeout,
            nats=args.nats,
            provisioned=not args.unsigned,
            kits=args.kits,
            connect_rate=args.connect_rate,
        )
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.no_report:
        return
    path = RESULTS / "scale.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    new = {(x["agents"], x.get("broker", "mosquitto")) for x in rows}
    keep = [r for r in old["rows"] if (r["agents"], r.get("broker", "mosquitto")) not in new]
    data = {
        "meta": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "bundle": Manifest.load(args.bundle).bundle_id[:12],
        },
        "rows": sorted(keep + rows, key=lambda r: (r.get("broker", "mosquitto") != "mosquitto", r["agents"])),
        "notes": old.get("notes", ""),
        "intake": old.get("intake"),  # bench_intake.py's section
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(write_report(data))
    print(plot(data))


if __name__ == "__main__":
    main()
