"""fedclip on a 3-node NATS cluster (MQTT on every node, JetStream clustered): a node dies mid-round.

The coordinator talks to node 0; 9 agents, 3 homed on each node, get every node's URL (their own
first) and fail over in `MqttSession`. The agents homed on node 2 hold their round-1 updates until
node 2 has been SIGKILLed, then publish: paho queues them, the session reconnects to another node
(the persistent session lives in replicated JetStream streams) and sends them. Both rounds must
aggregate exactly 9 updates each: none lost, none counted twice, nothing rejected.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fedclip.sdk.broker_cluster import NatsCluster, find_nats_server
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import MqttSession, Will
from fedclip.sdk.wire import Topics

N_AGENTS = 9
KILLED = 2


def _prepared(bundle: Path, fleet: str):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fleet_sim.py"
    spec = importlib.util.spec_from_file_location("fleet_sim", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fleet_sim"] = mod
    spec.loader.exec_module(mod)
    return mod.Prepared(Manifest.load(bundle), fleet)


class ClusterAgent(threading.Thread):
    """One simulated agent on an MqttSession with the cluster's URLs (its home node first)."""

    def __init__(self, i: int, urls: list[str], prep, hold: threading.Event | None):
        super().__init__(daemon=True)
        self.i, self.id, self.prep, self.hold = i, f"agent{i}", prep, hold
        self.topics = Topics(prep.fleet)
        home = i % len(urls)
        self.session = MqttSession(
            urls[home:] + urls[:home],
            self.id,
            keepalive=5,
            will=Will(self.topics.status(self.id), prep.status(self.id, "offline")),
        )
        self.session.on_connect.append(self._online)
        self.session.subscribe(self.topics.task(self.id), 1)
        self.tasks: set[int] = set()
        self.sent: set[int] = set()
        self.stop = threading.Event()
        self.error: Exception | None = None

    def _online(self, session: MqttSession) -> None:
        session.publish(
            self.topics.status(self.id), self.prep.status(self.id, "online"), retain=True, timeout=60
        )

    def run(self) -> None:
        try:
            self.session.connect(timeout=60)
            while not self.stop.is_set():
                msg = self.session.get(0.2)
                if msg is None or not msg.payload:
                    continue
                rnd, blob = self.prep.update(self.id, self.i, msg.payload)
                self.tasks.add(rnd)
                if rnd in self.sent:
                    continue
                if self.hold is not None and rnd == 1:
                    self.hold.wait(120)  # until the home node is dead
                self.session.publish(self.topics.update(self.id), blob, qos=1, timeout=120)
                self.sent.add(rnd)
        except Exception as e:  # reported by the test, with the agent's name
            self.error = e
        finally:
            self.session.close()


def _wait(
    cond, timeout: float, what: str, proc: subprocess.Popen, agents: list[ClusterAgent], cluster, log: Path
) -> None:
    """Poll `cond`; fail at once when the coordinator or an agent has died, saying what each was doing."""
    deadline = time.monotonic() + timeout
    while not cond():
        errors = {a.id: str(a.error) for a in agents if a.error}
        late = proc.poll() is not None or errors or time.monotonic() >= deadline
        if late and not cond():
            tail = log.read_text(errors="replace")[-3000:]
            tasked = {a.id: sorted(a.tasks) for a in agents}
            nodes = {f"n{i}": cluster.last_error(i) for i in range(cluster.n)}
            pytest.fail(
                f"{what}: coordinator rc {proc.poll()}, agent errors {errors}, tasks seen {tasked}, "
                f"last node log lines {nodes}\ncoordinator log tail:\n{tail}"
            )
        time.sleep(0.1)


@pytest.mark.slow
def test_round_survives_a_dead_node(bundle_factory, tmp_path):
    if find_nats_server() is None:
        if os.environ.get("CI"):
            pytest.fail("CI must provide nats-server (scripts/setup.sh installs it)")
        pytest.skip("nats-server is not installed (apt-get install nats-server)")
    bundle = bundle_factory(adapter="tri-lora", labels=("a", "b", "c"))
    fleet = "cluster"
    prep = _prepared(bundle, fleet)
    with NatsCluster(3) as cluster:
        urls = cluster.mqtt_urls
        cfg = {
            "broker": urls[0],
            "fleet": fleet,
            "bundle": str(bundle),
            "state": str(tmp_path / "state"),
            "strategy": "ce-lora",
            "rounds": 2,
            "selection": "all",
            "min_updates": N_AGENTS,
            "round_timeout": 300,
            "http": False,
        }
        (tmp_path / "coord.yaml").write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
        log = open(tmp_path / "coord.log", "wb")
        coord = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "fedclip-coord"),
                "serve",
                "--config",
                str(tmp_path / "coord.yaml"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        killed = threading.Event()
        agents = [ClusterAgent(i, urls, prep, killed if i % 3 == KILLED else None) for i in range(N_AGENTS)]
        try:
            for a in agents:
                a.start()
            _wait(
                lambda: all(1 in a.tasks for a in agents),
                180,
                "round 1 tasks",
                coord,
                agents,
                cluster,
                tmp_path / "coord.log",
            )
            cluster.kill(KILLED)  # mid-round: a third of the updates are not sent yet
            killed.set()
            coord.wait(timeout=240)
        finally:
            killed.set()
            for a in agents:
                a.stop.set()
            for a in agents:
                a.join(30)
            if coord.poll() is None:
                coord.kill()
            log.close()
        text = (tmp_path / "coord.log").read_text(errors="replace")
        assert coord.returncode == 0, text[-2000:]
        assert [a.id for a in agents if a.error] == [], [str(a.error) for a in agents if a.error]
        dead = f":{cluster.ports[KILLED]['mqtt']}"
        moved = [a for a in agents if a.i % 3 == KILLED]
        assert all(not str(a.session.address).endswith(dead) for a in moved)
    con = sqlite3.connect(tmp_path / "state" / "coordinator.sqlite")
    try:
        per_round = dict(con.execute("SELECT round, COUNT(*) FROM updates GROUP BY round"))
        agents_r1 = {r[0] for r in con.execute("SELECT agent FROM updates WHERE round = 1")}
        rejected = con.execute("SELECT COUNT(*) FROM rejections").fetchone()[0]
        states = dict(con.execute("SELECT round, state FROM rounds"))
    finally:
        con.close()
    assert per_round == {1: N_AGENTS, 2: N_AGENTS}  # the primary key (round, agent): never twice
    assert agents_r1 == {a.id for a in agents}  # none lost
    assert rejected == 0
    assert states == {1: "aggregated", 2: "aggregated"}
    closed = [json.loads(line) for line in (tmp_path / "state" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["round"], m["updates"]) for m in closed] == [(1, N_AGENTS), (2, N_AGENTS)]
