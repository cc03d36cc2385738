"""Fleet simulator: N simulated agents on N real MQTT connections against the real coordinator.

One process, one thread, one `selectors` loop over N paho clients (paho's external-loop API:
`loop_read` / `loop_write` driven by the socket callbacks), so 10,000 connections cost 10,000
sockets, not 10,000 threads. Each simulated agent does what `fedclip-agent start` does on the wire,
without ONNX Runtime:

- connects with a fixed client id, a persistent session and a retained `offline` last will;
- subscribes to its task topic and publishes a valid retained `online` status (bundle id, samples);
- answers every task with a valid update: the task's starting tensors plus a prepared delta (one of
  64 directions, so updates differ), the `stats/*` tensors the task asks for (label histogram as
  float32, per-label mean and variance as float16, as the agent sends them) and a `data_digest`;
  when the task's `stats_digest` is that digest, only the histogram travels (statistics sent once).

`run()` starts a real mosquitto (or uses `--broker` URLs, spread over the agents), the real
`fedclip-coord serve` as a subprocess (ce-lora, every agent selected, quorum = N, 2 rounds: the
second round's tasks carry each agent's personalized adapter), drives the fleet until the
coordinator has aggregated both rounds, and reports phase times, peak RSS and CPU of coordinator
and broker, and bytes.

    python benchmarks/fleet_sim.py --bundle /tmp/bundle --agents 1000,10000
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import selectors
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import BrokerAddress
from fedclip.sdk.wire import (
    STAT_LABEL_HIST,
    STAT_MEAN,
    STAT_VAR,
    Envelope,
    MsgType,
    Topics,
    decode,
    encode,
)

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = 64  # distinct update directions / data statistics in the simulated fleet
KEEPALIVE = 3600  # s: no PINGREQ traffic from 10,000 clients during a run


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE (inherited by the broker and coordinator we start) towards `want`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = min(max(soft, want), hard) if hard != resource.RLIM_INFINITY else max(soft, want)
    resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return new


# ---- prepared payloads ----------------------------------------------------------------------------
class Prepared:
    """What every simulated agent sends, built once from the bundle's manifest."""

    def __init__(self, manifest: Manifest, fleet: str, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.manifest, self.fleet = manifest, fleet
        self.labels = max(1, len(manifest.task.labels))
        self.dim = manifest.base_model.embed_dim
        ex = manifest.exchanged
        self.deltas = [
            {t.name: (0.01 * rng.standard_normal(t.shape)).astype(np.float32) for t in ex}
            for _ in range(GROUPS)
        ]
        self.hist = [
            np.round(100 * rng.uniform(0, 1, self.labels) ** 2 + 1).astype(np.float32) for _ in range(GROUPS)
        ]
        self.mean = [
            (0.05 * rng.standard_normal((self.labels, self.dim))).astype(np.float16) for _ in range(GROUPS)
        ]
        self.var = [
            rng.uniform(0.5, 2.0, (self.labels, self.dim)).astype(np.float16) * np.float16(1e-3)
            for _ in range(GROUPS)
        ]

    @staticmethod
    def digest(agent: str) -> str:
        return hashlib.sha256(f"fleet-sim/{agent}".encode()).hexdigest()

    def status(self, agent: str, state: str, last_round: int = 0, adapter: str = "") -> bytes:
        body = {
            "state": state,
            "bundle_id": self.manifest.bundle_id,
            "adapter_version": adapter,
            "last_round": last_round,
            "versions": {"python": platform.python_version(), "fleet_sim": "1"},
            "device": {"kind": "sim", "machine": platform.machine(), "system": "Linux"},
            "groups": ["sim"],
            "num_samples": 100,
        }
        env = Envelope(MsgType.STATUS, self.fleet, agent, round=last_round, base_version=adapter, body=body)
        return encode(env)

    def update(self, agent: str, index: int, task_payload: bytes) -> tuple[int, bytes] | None:
        """(round, update blob) answering a task; None for an emptied (closed) task."""
        if not task_payload:
            return None
        msg = decode(task_payload, fleet=self.fleet, expect=MsgType.TASK, where=f"task of {agent}")
        env, body = msg.envelope, msg.envelope.body
        g = index % GROUPS
        start = msg.adapter_tensors
        tensors = {n: (np.asarray(start[n]) + d).astype(np.float32) for n, d in self.deltas[g].items()}
        kinds = list(body.get("stats", []))
        digest = self.digest(agent)
        out_body = {
            "bundle_id": self.manifest.bundle_id,
            "num_samples": int(self.hist[g].sum()),
            "metrics": {"accuracy_before": 0.5, "accuracy_after": 0.6, "steps": 1.0},
            "train_seconds": 0.0,
            "skipped_images": 0,
        }
        if kinds:
            out_body["data_digest"] = digest
            tensors[STAT_LABEL_HIST] = self.hist[g]
            if "gaussian" in kinds and body.get("stats_digest") != digest:
                tensors[STAT_MEAN] = self.mean[g]
                tensors[STAT_VAR] = self.var[g]
        out = Envelope(
            MsgType.UPDATE, self.fleet, agent, round=env.round, base_version=env.base_version, body=out_body
        )
        return env.round, encode(out, tensors)


# ---- the fleet: N paho clients on one selector ----------------------------------------------------
@dataclass
class Counters:
    connected: int = 0
    status_acked: int = 0
    tasks: dict[int, int] = field(default_factory=dict)  # round -> tasks received
    updates_acked: dict[int, int] = field(default_factory=dict)
    bytes_out: int = 0
    bytes_in: int = 0
    disconnects: int = 0
    first: dict[str, float] = field(default_factory=dict)  # event -> first time
    last: dict[str, float] = field(default_factory=dict)  # event -> last time

    def mark(self, event: str) -> None:
        now = time.time()
        self.first.setdefault(event, now)
        self.last[event] = now


class SimFleet:
    """N simulated agents sharing one selector loop (call `step()` from one thread)."""

    def __init__(self, urls: list[str], n: int, prepared: Prepared, prefix: str = "sim"):
        self.prep = prepared
        self.topics = Topics(prepared.fleet)
        self.sel = selectors.DefaultSelector()
        self.c = Counters()
        self.ids = [f"{prefix}{i:05d}" for i in range(n)]
        self.addrs = [BrokerAddress.parse(u) for u in urls]
        self.clients: list[paho.Client] = []
        self.pending: list[tuple[int, bytes]] = []  # (agent index, task payload) to answer
        self.pub_mids: dict[tuple[int, int], tuple[str, int]] = {}  # (agent, mid) -> (kind, round)
        self.answered: set[tuple[int, int]] = set()  # (agent, round) answered
        self.reject_errors: list[str] = []

    # paho external-loop socket callbacks
    def _sock_open(self, client, userdata, sock) -> None:
        self.sel.register(sock, selectors.EVENT_READ, client)

    def _sock_close(self, client, userdata, sock) -> None:
        try:
            self.sel.unregister(sock)
        except (KeyError, ValueError):
            pass

    def _want_write(self, client, userdata, sock) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
        except (KeyError, ValueError):
            pass

    def _no_write(self, client, userdata, sock) -> None:
        try:
            self.sel.modify(sock, selectors.EVENT_READ, client)
        except (KeyError, ValueError):
            pass

    def _client(self, i: int) -> paho.Client:
        agent = self.ids[i]
        cl = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=agent,
            clean_session=False,
            protocol=paho.MQTTv311,
            userdata=i,
        )
        cl.max_inflight_messages_set(20)
        cl.will_set(self.topics.status(agent), self.prep.status(agent, "offline"), qos=1, retain=True)
        cl.on_socket_open = self._sock_open
        cl.on_socket_close = self._sock_close
        cl.on_socket_register_write = self._want_write
        cl.on_socket_unregister_write = self._no_write
        cl.on_connect = self._on_connect
        cl.on_message = self._on_message
        cl.on_publish = self._on_publish
        cl.on_disconnect = self._on_disconnect
        return cl

    def connect_all(self, progress=None) -> None:
        for i in range(len(self.ids)):
            cl = self._client(i)
            a = self.addrs[i % len(self.addrs)]
            cl.connect(a.host, a.port, KEEPALIVE)
            self.clients.append(cl)
            if i % 200 == 199:  # let the broker's CONNACKs in while we open more
                self.step(0)
                if progress:
                    progress(i + 1)

    def _on_connect(self, client, i, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self.reject_errors.append(f"{self.ids[i]}: connect refused: {reason_code}")
            return
        self.c.connected += 1
        self.c.mark("connack")
        agent = self.ids[i]
        client.subscribe(self.topics.task(agent), 1)
        payload = self.prep.status(agent, "online")
        info = client.publish(self.topics.status(agent), payload, qos=1, retain=True)
        self.pub_mids[(i, info.mid)] = ("status", 0)
        self.c.bytes_out += len(payload)

    def _on_disconnect(self, client, i, flags, reason_code, properties) -> None:
        self.c.disconnects += 1
        self.c.connected -= 1

    def _on_message(self, client, i, msg) -> None:
        self.c.bytes_in += len(msg.payload)
        if msg.payload:
            self.pending.append((i, bytes(msg.payload)))

    def _on_publish(self, client, i, mid, reason_code, properties) -> None:
        kind, rnd = self.pub_mids.pop((i, mid), ("?", 0))
        if kind == "status":
            self.c.status_acked += 1
            self.c.mark("status_acked")
        elif kind == "update":
            self.c.updates_acked[rnd] = self.c.updates_acked.get(rnd, 0) + 1
            self.c.mark(f"update_acked_r{rnd}")

    def _answer(self) -> None:
        pending, self.pending = self.pending, []
        for i, payload in pending:
            out = self.prep.update(self.ids[i], i, payload)
            if out is None:
                continue
            rnd, blob = out
            self.c.tasks[rnd] = self.c.tasks.get(rnd, 0) + 1
            self.c.mark(f"task_r{rnd}")
            if (i, rnd) in self.answered:  # a redelivered task: the agent republishes the same update
                continue
            self.answered.add((i, rnd))
            info = self.clients[i].publish(self.topics.update(self.ids[i]), blob, qos=1)
            self.pub_mids[(i, info.mid)] = ("update", rnd)
            self.c.bytes_out += len(blob)
            self.c.mark(f"update_sent_r{rnd}")

    def step(self, timeout: float) -> None:
        for key, events in self.sel.select(timeout):
            cl = key.data
            if events & selectors.EVENT_READ:
                cl.loop_read()
            if events & selectors.EVENT_WRITE:
                cl.loop_write()
        if self.pending:
            self._answer()

    def misc(self) -> None:
        for cl in self.clients:
            cl.loop_misc()

    def close(self) -> None:
        for cl in self.clients:
            try:
                cl.disconnect()
                cl.loop_write()
            except Exception:  # closing: the broker cleans up what we could not say
                pass
        self.sel.close()


# ---- process monitoring ---------------------------------------------------------------------------
def proc_sample(pid: int) -> tuple[float, float] | None:
    """(cpu seconds user+system, peak RSS MB) of a live process from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        hwm = 0.0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) / 1024
        return cpu, hwm
    except (OSError, IndexError, ValueError):
        return None


class Monitor(threading.Thread):
    """Samples CPU and peak RSS of named processes every `every` seconds."""

    def __init__(self, pids: dict[str, int], every: float = 0.5):
        super().__init__(daemon=True)
        self.pids, self.every = pids, every
        self.samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)

    def sample(self) -> None:
        now = time.time()
        for name, pid in self.pids.items():
            s = proc_sample(pid)
            if s is not None:
                self.samples[name].append((now, *s))

    def cpu_between(self, name: str, t0: float, t1: float) -> float:
        rows = self.samples[name]
        if not rows:
            return 0.0

        def at(t: float) -> float:
            before = [r[1] for r in rows if r[0] <= t]
            return before[-1] if before else rows[0][1]

        return round(at(t1) - at(t0), 2)

    def peak_rss(self, name: str) -> float:
        return round(max((r[2] for r in self.samples[name]), default=0.0), 1)

    def cpu_total(self, name: str) -> float:
        rows = self.samples[name]
        return round(rows[-1][1] - rows[0][1], 2) if rows else 0.0


class LogWatch(threading.Thread):
    """Reads the coordinator's log lines and timestamps the ones that mark round phases."""

    PATTERNS = {
        "connected": re.compile(r"MQTT connected to \S+ as '(fedclip-coord)"),
        "started": re.compile(r"round (\d+): started with (\d+)"),
        "aggregated": re.compile(r"round (\d+): aggregated (\d+) updates with \S+ in ([\d.]+)s"),
        "failed": re.compile(r"round (\d+): (failed|below quorum)"),
    }

    def __init__(self, stream, log_path: Path):
        super().__init__(daemon=True)
        self.stream, self.log_path = stream, log_path
        self.events: dict[str, float] = {}
        self.aggregate_seconds: dict[int, float] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        with open(self.log_path, "w") as out:
            for raw in self.stream:
                line = raw.decode(errors="replace")
                out.write(line)
                for name, pat in self.PATTERNS.items():
                    m = pat.search(line)
                    if m:
                        key = name if name == "connected" else f"{name}_r{m.group(1)}"
                        self.events.setdefault(key, time.time())
                        if name == "aggregated":
                            self.aggregate_seconds[int(m.group(1))] = float(m.group(3))
                if " ERROR " in line or "Traceback" in line:
                    self.errors.append(line.strip()[:300])


# ---- one run --------------------------------------------------------------------------------------
def _wait(fleet: SimFleet, cond, deadline: float, what: str, proc: subprocess.Popen | None) -> None:
    last_misc = time.monotonic()
    while not cond():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        if proc is not None and proc.poll() is not None and not cond():
            raise RuntimeError(f"coordinator exited (rc {proc.returncode}) while waiting for {what}")
        fleet.step(0.05)
        if time.monotonic() - last_misc > 30:
            fleet.misc()
            last_misc = time.monotonic()


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
    say=print,
) -> dict:
    """One simulated fleet of `n` agents through `rounds` rounds; returns the report row."""
    from fedclip.sdk.broker import MosquittoBroker

    raise_nofile(n + 4096)
    manifest = Manifest.load(bundle)
    fleet_id = "sim"
    tmp = tempfile.TemporaryDirectory(prefix="fleet-sim-")
    work = Path(workdir or tmp.name)
    broker = None
    if broker_urls is None:
        broker = MosquittoBroker()
        conf = broker.dir / "mosquitto.conf"
        # No connection limit, and no log line per connect and disconnect (10,000 of each).
        conf.write_text(conf.read_text() + "max_connections -1\nconnection_messages false\n")
        broker.start()
        broker_urls = [broker.url]
    coord_url = coordinator_url or broker_urls[0]
    state = work / "state"
    cfg = {
        "broker": coord_url,
        "fleet": fleet_id,
        "bundle": str(bundle),
        "state": str(state),
        "strategy": strategy,
        "rounds": rounds,
        "clients_per_round": 0,
        "selection": "all",
        "min_updates": n,
        "round_timeout": timeout,
        "http": False,
        "publish_timeout": 120.0,
    }
    (work / "coord.yaml").write_text("\n".join(f"{k}: {json.dumps(v)}" for k, v in cfg.items()) + "\n")
    prep = Prepared(manifest, fleet_id)
    fleet = SimFleet(broker_urls, n, prep)
    coord_bin = Path(sys.executable).parent / "fedclip-coord"
    coord = subprocess.Popen(
        [str(coord_bin), "serve", "--config", str(work / "coord.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    watch = LogWatch(coord.stderr, work / "coordinator.log")
    watch.start()
    pids = {"coordinator": coord.pid}
    if broker is not None and broker._proc is not None:
        pids["broker"] = broker._proc.pid
    mon = Monitor(pids)
    mon.start()
    sim_cpu0 = time.process_time()
    deadline = time.time() + timeout
    row: dict = {"agents": n, "rounds": rounds, "strategy": strategy, "brokers": len(broker_urls)}
    t: dict[str, float] = {}
    try:
        # The coordinator first: its start-up (imports, state dir) is not a phase of the round.
        _wait(fleet, lambda: "connected" in watch.events, deadline, "the coordinator to connect", coord)
        t["start"] = time.time()
        say(f"[{n}] connecting {n} agents")
        fleet.connect_all(
            progress=lambda k: say(f"[{n}]   {k} connections opened") if k % 2000 == 0 else None
        )
        _wait(fleet, lambda: fleet.c.status_acked >= n, deadline, "online statuses acknowledged", coord)
        t["status_done"] = time.time()
        say(f"[{n}] all {n} online ({t['status_done'] - t['start']:.1f}s); waiting for round 1")
        for r in range(1, rounds + 1):
            _wait(fleet, lambda r=r: fleet.c.tasks.get(r, 0) >= n, deadline, f"round {r} tasks", coord)
            say(f"[{n}] round {r}: {n} tasks received, updates going out")
            _wait(fleet, lambda r=r: fleet.c.updates_acked.get(r, 0) >= n, deadline, f"round {r} sent", coord)
            _wait(
                fleet,
                lambda r=r: f"aggregated_r{r}" in watch.events,
                deadline,
                f"round {r} aggregated",
                coord,
            )
            say(f"[{n}] round {r}: aggregated in {watch.aggregate_seconds.get(r, 0):.2f}s")
        coord.wait(timeout=max(10.0, deadline - time.time()))
        t["end"] = time.time()
    except (TimeoutError, RuntimeError) as e:
        row["error"] = str(e)
        say(f"[{n}] FAILED: {e}")
    finally:
        mon.sample()
        mon.stop.set()
        disconnects = fleet.c.disconnects  # before our own disconnects at the end
        sim_cpu = time.process_time() - sim_cpu0
        if coord.poll() is None:
            coord.terminate()
            try:
                coord.wait(timeout=30)
            except subprocess.TimeoutExpired:
                coord.kill()
        fleet.close()
        if broker is not None:
            broker.cleanup()
    ev, c = watch.events, fleet.c
    row.update(_phases(t, ev, c, watch, mon, rounds, _intake_ends(state)))
    row.update(
        {
            "coordinator_peak_rss_mb": mon.peak_rss("coordinator"),
            "coordinator_cpu_s": mon.cpu_total("coordinator"),
            "broker_peak_rss_mb": mon.peak_rss("broker") if "broker" in pids else None,
            "broker_cpu_s": mon.cpu_total("broker") if "broker" in pids else None,
            "sim_cpu_s": round(sim_cpu, 2),
            "sim_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "bytes_agents_sent": c.bytes_out,
            "bytes_agents_received": c.bytes_in,
            "disconnects": disconnects,
            "coordinator_errors": watch.errors[:5],
            "load_avg_1min_end": round(os.getloadavg()[0], 2),
        }
    )
    row["update_bytes_mean"] = _update_bytes(state, rounds)
    tmp.cleanup()  # a caller's `workdir` (the state dir in it) stays for inspection
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


# ---- report ---------------------------------------------------------------------------------------
def write_report(data: dict) -> Path:
    rows = data["rows"]
    lines = [
        "# A round at fleet scale: simulated agents against the real coordinator and broker",
        "",
        "Produced by `python benchmarks/fleet_sim.py` (raw numbers in `scale.json`; plot `scale.png`).",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in sorted(data["meta"].items())),
        "",
        "## Phase times (seconds; coordinator CPU seconds in brackets)",
        "",
    ]
    names = []
    for r in rows:
        for p in r.get("phases", []):
            if p["phase"] not in names:
                names.append(p["phase"])
    lines.append("| phase | " + " | ".join(f"N = {r['agents']:,}" for r in rows) + " |")
    lines.append("|---|" + "---:|" * len(rows))
    for name in names:
        cells = []
        for r in rows:
            p = next((p for p in r.get("phases", []) if p["phase"] == name), None)
            cells.append(f"{p['seconds']} ({p['coordinator_cpu_s']})" if p else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Processes and bytes", ""]
    keys = [
        ("coordinator_peak_rss_mb", "coordinator peak RSS MB"),
        ("coordinator_cpu_s", "coordinator CPU s (whole run)"),
        ("broker_peak_rss_mb", "mosquitto peak RSS MB"),
        ("broker_cpu_s", "mosquitto CPU s (whole run)"),
        ("sim_cpu_s", "simulator CPU s"),
        ("sim_peak_rss_mb", "simulator peak RSS MB"),
        ("bytes_agents_sent", "bytes agents sent (payloads)"),
        ("bytes_agents_received", "bytes agents received (payloads)"),
        ("update_bytes_mean", "mean update bytes per round"),
        ("disconnects", "disconnects"),
        ("load_avg_1min_end", "1-min load average at the end"),
        ("error", "error"),
    ]
    lines.append("| | " + " | ".join(f"N = {r['agents']:,}" for r in rows) + " |")
    lines.append("|---|" + "---:|" * len(rows))
    for k, label in keys:
        if any(k in r for r in rows):
            lines.append(f"| {label} | " + " | ".join(str(r.get(k, "-")) for r in rows) + " |")
    lines += ["", data.get("notes", "")]
    out = RESULTS / "scale.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def plot(data: dict) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = [r for r in data["rows"] if r.get("phases")]
    if not rows:
        return None
    names = []
    for r in rows:
        names += [p["phase"] for p in r["phases"] if p["phase"] not in names]
    fig, ax = plt.subplots(figsize=(8, 5))
    ns = [r["agents"] for r in rows]
    for name in names:
        ys = [next((p["seconds"] for p in r["phases"] if p["phase"] == name), np.nan) for r in rows]
        ax.plot(ns, ys, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("agents per round (N)")
    ax.set_ylabel("seconds")
    ax.set_title("Round phases against fleet size (2 shared cores, mosquitto, ce-lora)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    out = RESULTS / "scale.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a tri-lora bundle (shapes of its manifest)")
    ap.add_argument("--agents", default="1000", help="comma list of N")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--broker", default="", help="comma list of broker URLs (default: start mosquitto)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="per N, seconds")
    ap.add_argument("--no-report", action="store_true", help="print rows, write nothing")
    args = ap.parse_args()
    urls = [u for u in args.broker.split(",") if u] or None
    rows = []
    for n in (int(x) for x in args.agents.split(",")):
        row = run(args.bundle, n, broker_urls=urls, rounds=args.rounds, timeout=args.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    if args.no_report:
        return
    path = RESULTS / "scale.json"
    old = json.loads(path.read_text()) if path.exists() else {"rows": []}
    keep = [r for r in old["rows"] if r["agents"] not in {x["agents"] for x in rows}]
    data = {
        "meta": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "bundle": Manifest.load(args.bundle).bundle_id[:12],
        },
        "rows": sorted(keep + rows, key=lambda r: r["agents"]),
        "notes": old.get("notes", ""),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(write_report(data))
    print(plot(data))


if __name__ == "__main__":
    main()
