"""A burst of MQTT sessions on a local 3-node NATS cluster, per JetStream consumer setting (issue 14).

N simulated agents (the fleet simulator's paho clients) connect at once, or at `--rate` per second,
each with a persistent session, a QoS 1 subscription to its task topic and a retained status. Then a
coordinator-like client publishes one retained task to each. Reported per variant of the cluster's
`mqtt {}` block: seconds until every subscription was granted, SUBACKs refused (and retried by the
simulator), tasks delivered and in how long, the JetStream consumers left, and the three nodes' CPU.
`benchmarks/results/nats_cluster.md` holds a run; `fleet_sim.py --nats 3` runs whole rounds.

    python benchmarks/bench_nats_burst.py --bundle bundles/tiny --variants file,memory,r1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _sim_agents import Prepared, SimFleet  # noqa: E402

from fedclip.sdk.broker_cluster import MQTT_DEFAULTS, NatsCluster  # noqa: E402
from fedclip.sdk.manifest import Manifest  # noqa: E402

VARIANTS: dict[str, dict[str, str | int | bool]] = {
    "file": {"consumer_memory_storage": False},  # NATS's default
    "memory": {},  # NatsCluster's default: consumer_memory_storage
    "r1": {"consumer_memory_storage": False, "consumer_replicas": 1},
}


def _cpu_s(pid: int | None) -> float:
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Fleet(SimFleet):
    """The simulator's fleet, counting granted subscriptions and delivered tasks instead of answering."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.granted: set[int] = set()
        self.got: set[int] = set()

    def _on_subscribe(self, client, i, mid, reason_codes, properties) -> None:
        super()._on_subscribe(client, i, mid, reason_codes, properties)
        if not any(rc.is_failure for rc in reason_codes):
            self.granted.add(i)

    def _on_message(self, client, i, msg) -> None:
        if msg.payload:
            self.got.add(i)


def _until(fleet: _Fleet, done, timeout: float) -> float:
    t0 = time.time()
    while not done() and time.time() < t0 + timeout:
        fleet.step(0.1)
    return round(time.time() - t0, 1)


def run(bundle: Path, n: int, name: str, rate: float, timeout: float) -> dict:
    mqtt = {**MQTT_DEFAULTS, **VARIANTS[name]}
    prep = Prepared(Manifest.load(bundle), "sim")
    row: dict = {"variant": name, "mqtt": mqtt, "agents": n, "rate": rate}
    with NatsCluster(3, mqtt=mqtt) as cluster:
        pids = [cluster.pid(i) for i in range(3)]
        cpu0 = sum(_cpu_s(p) for p in pids)
        # The coordinator first, as in a deployment: the first MQTT client of an account makes
        # NATS create the MQTT streams, and a client whose connect waits on that may be dropped.
        acks, connected = [0], threading.Event()
        pub = paho.Client(CallbackAPIVersion.VERSION2, client_id="coordinator", clean_session=False)
        pub.on_publish = lambda *a: acks.__setitem__(0, acks[0] + 1)
        pub.on_connect = lambda *a: connected.set()
        node0 = urlsplit(cluster.mqtt_urls[0])
        pub.connect(node0.hostname or "", node0.port or 1883, 60)
        pub.loop_start()
        if not connected.wait(timeout):
            raise RuntimeError("the coordinator's client did not connect to node 0")
        fleet = _Fleet(cluster.mqtt_urls, n, prep)
        fleet.connect_all(rate=rate)
        row["subscribed_s"] = _until(fleet, lambda: len(fleet.granted) >= n, timeout)
        row.update(granted=len(fleet.granted), refused=fleet.c.refused_subs, statuses=fleet.c.status_acked)
        for agent in fleet.ids:
            pub.publish(fleet.topics.task(agent), b"x" * 900, qos=1, retain=True)
        row["tasks_s"] = _until(fleet, lambda: len(fleet.got) >= n and acks[0] >= n, timeout)
        row.update(tasks_delivered=len(fleet.got), tasks_acked=acks[0])
        with urllib.request.urlopen(
            f"http://{node0.hostname}:{cluster.ports[0]['http']}/jsz", timeout=10
        ) as r:
            row["consumers"] = json.load(r).get("consumers")
        row["broker_cpu_s"] = round(sum(_cpu_s(p) for p in pids) - cpu0, 1)
        pub.loop_stop()
        fleet.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="a bundle (the statuses name it)")
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--variants", default="file,memory,r1", help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--rate", type=float, default=0.0, help="connects per second (0: all at once)")
    ap.add_argument("--timeout", type=float, default=240.0, help="per phase, seconds")
    args = ap.parse_args()
    for name in args.variants.split(","):
        print(json.dumps(run(args.bundle, args.agents, name, args.rate, args.timeout)), flush=True)


if __name__ == "__main__":
    main()
