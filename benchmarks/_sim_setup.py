"""One simulated fleet set up and torn down: broker, provisioned state, `fedclip-coord serve`, agents.

Shared by `fleet_sim.py` (whole rounds) and `bench_intake.py` (a burst of updates). `start` makes
the kits (or reuses a cache of them, `_sim_kits`), starts a mosquitto on the fleet's generated config
(or a NATS cluster, or uses given broker URLs), the real coordinator as a subprocess with the
settings asked for, a log watcher and a /proc monitor, and the N simulated agents (not yet
connected). `stop` ends all of it; `wait` drives the agents until a condition holds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _sim_kits
from _sim_agents import Prepared, SimFleet, agent_ids, raise_nofile
from _sim_watch import LogWatch, Monitor

from fedclip.sdk.manifest import Manifest

FLEET = "sim"
# A big fleet on one mosquitto: no connection limit, no log line per connect, and enough QoS 1
# messages in flight to the coordinator for its batches (group commit) to fill (docs/scale.md).
MOSQUITTO_EXTRA = "max_connections -1\nconnection_messages false\nmax_inflight_messages 1024\n"


@dataclass
class Sim:
    work: Path
    state: Path
    fleet: SimFleet
    coord: subprocess.Popen
    watch: LogWatch
    mon: Monitor
    pids: dict[str, int]
    broker_urls: list[str]
    broker: Any = None  # MosquittoBroker started here
    cluster: Any = None  # NatsCluster started here
    provisioned: bool = False
    tmp: Any = None  # the temporary work dir when no `workdir` was given


def start(
    bundle: Path,
    n: int,
    settings: dict[str, Any],
    *,
    broker_urls: list[str] | None = None,
    coordinator_url: str | None = None,
    nats: int = 0,
    provisioned: bool = True,
    kits: Path | None = None,
    hold: bool = False,
    workdir: Path | None = None,
    env: dict[str, str] | None = None,
    say=print,
) -> Sim:
    """Everything of one run, the coordinator connecting; `settings` go into its config file.

    Provisioned (the default): kits for the N agents (from the `kits` cache folder when given), the
    coordinator's state dir provisioned, and (with the mosquitto started here) the fleet's logins
    and ACL enforced by the broker. `env`: extra environment of the coordinator process."""
    from fedclip.sdk.broker_cluster import NatsCluster
    from fedclip.sdk.broker_mosquitto import MosquittoBroker

    raise_nofile(n + 4096)
    manifest = Manifest.load(bundle)
    tmp = tempfile.TemporaryDirectory(prefix="fleet-sim-")
    work = Path(workdir or tmp.name)
    state = work / "state"
    ids = agent_ids(n)
    creds = None
    if provisioned:
        cache = kits or work / "kits"
        say(f"[{n}] provisioning kits in {cache}")
        _sim_kits.provision(cache, FLEET, ids, say)
        _sim_kits.install(cache, state)
        creds = _sim_kits.credentials(cache, ids)
    broker = cluster = None
    login: dict[str, str] = {}
    if broker_urls is None and nats:
        cluster = NatsCluster(nats)
        broker_urls = cluster.start()
    elif broker_urls is None:
        if provisioned:
            broker = _sim_kits.broker(state, work, MOSQUITTO_EXTRA)
            login = _sim_kits.coordinator_login(state)
        else:
            broker = MosquittoBroker()
            conf = broker.dir / "mosquitto.conf"
            conf.write_text(MOSQUITTO_EXTRA + conf.read_text())
        broker.start()
        broker_urls = [broker.url]
    cfg = {
        "broker": coordinator_url or broker_urls[0],
        "fleet": FLEET,
        "bundle": str(bundle),
        "state": str(state),
        "http": False,
        "publish_timeout": 120.0,
        **login,
        **settings,
    }
    (work / "coord.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n")
    prep = Prepared(manifest, FLEET, keys=creds.keys if creds else None)
    # Broker logins only where the broker enforces them (our provisioned mosquitto).
    passwords = creds.passwords if creds and login else None
    fleet = SimFleet(broker_urls, n, prep, passwords=passwords, hold=hold)
    coord, watch = start_coordinator(work, env)
    pids = {"coordinator": coord.pid}
    if broker is not None and broker._proc is not None:
        pids["broker"] = broker._proc.pid
    for i in range(nats if cluster is not None else 0):
        pids["broker" if i == 0 else f"broker_n{i}"] = cluster.pid(i)
    mon = Monitor(pids)
    mon.start()
    return Sim(work, state, fleet, coord, watch, mon, pids, broker_urls, broker, cluster, provisioned, tmp)


def start_coordinator(work: Path, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, LogWatch]:
    """`fedclip-coord serve` on `work/coord.yaml`, its log watched (and appended to
    `work/coordinator.log`: a restarted coordinator's lines follow the first one's)."""
    coord_bin = Path(sys.executable).parent / "fedclip-coord"
    coord = subprocess.Popen(
        [str(coord_bin), "serve", "--config", str(work / "coord.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    watch = LogWatch(coord.stderr, work / "coordinator.log")
    watch.start()
    return coord, watch


def restart_coordinator(sim: Sim, env: dict[str, str] | None = None) -> None:
    """A new coordinator process on the same state dir (the old one must have exited)."""
    assert sim.coord.poll() is not None, "the coordinator is still running"
    sim.coord, sim.watch = start_coordinator(sim.work, env)
    sim.pids["coordinator"] = sim.coord.pid
    sim.mon.pids["coordinator"] = sim.coord.pid


def broker_name(sim: Sim) -> str:
    if sim.cluster is not None:
        return f"nats x{len(sim.broker_urls)}"
    return "given" if sim.broker is None else "mosquitto"


def wait(sim: Sim, cond, deadline: float, what: str, coordinator: bool = True) -> None:
    """Drive the agents until `cond()`; TimeoutError after `deadline`, RuntimeError if the
    coordinator exits first (unless `coordinator` is False: it is down on purpose)."""
    last_misc = time.monotonic()
    proc = sim.coord
    while not cond():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        if coordinator and proc.poll() is not None and not cond():
            raise RuntimeError(f"coordinator exited (rc {proc.returncode}) while waiting for {what}")
        sim.fleet.step(0.05)
        if time.monotonic() - last_misc > 30:
            sim.fleet.misc()
            last_misc = time.monotonic()


def stop(sim: Sim) -> int:
    """Stop the monitor, the coordinator (if still running), the agents and the brokers; returns
    the agents' disconnects seen before (ours at the end are not counted)."""
    sim.mon.sample()
    sim.mon.stop.set()
    disconnects = sim.fleet.c.disconnects
    if sim.coord.poll() is None:
        sim.coord.terminate()
        try:
            sim.coord.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sim.coord.kill()
            sim.coord.wait(timeout=30)
    sim.fleet.close()
    if sim.broker is not None:
        sim.broker.cleanup()
    if sim.cluster is not None:
        sim.cluster.cleanup()
    return disconnects
