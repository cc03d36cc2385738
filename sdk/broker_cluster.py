"""A local NATS cluster with MQTT on every node: fedclip on a clustered broker, for tests and trials.

`NatsCluster(nodes=3)` writes one config per node in a temp dir and runs `nats-server -c` for each:
client, cluster-route, MQTT and monitoring listeners on free 127.0.0.1 ports, JetStream on (the MQTT
gateway keeps sessions, retained messages and QoS 1 messages in JetStream streams, replicated over
the cluster, so a client that loses its node reconnects to another and finds its session there).
`.mqtt_urls` lists the nodes' MQTT URLs; `.kill(i)` ends node i with SIGKILL.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from fedclip.sdk.broker_ports import LOCALHOST, free_port, wait_for_port
from fedclip.sdk.errors import BrokerError


def find_nats_server() -> str | None:
    return shutil.which("nats-server") or next(
        (p for p in ("/usr/sbin/nats-server", "/usr/bin/nats-server") if Path(p).exists()), None
    )


# Every QoS 1 subscription of every MQTT session is a durable JetStream consumer, by default on
# file with as many replicas as the streams (R3: a Raft group of its own per subscription). At 1,000
# agents that is 1,000+ Raft groups created in the connect burst: their creation timed out (SUBACK
# refused) and the cluster stayed saturated (80 of 1,000 subscribed after 4 minutes, 414 CPU s).
# In memory the consumers keep their 3 replicas (a node may die) without the file stores and
# fsyncs: 1,000 agents subscribed in 25 s and all got their tasks, 36 CPU s
# (benchmarks/results/nats_cluster.md). A whole-cluster restart loses the consumers' positions; the
# sessions and retained messages (streams, on file) survive it.
MQTT_DEFAULTS: dict[str, str | int | bool] = {"ack_wait": "30s", "consumer_memory_storage": True}


class NatsCluster:
    """`nodes` nats-server processes routed into one cluster, MQTT enabled on each."""

    def __init__(
        self,
        nodes: int = 3,
        binary: str | None = None,
        name: str = "fedclip",
        mqtt: dict[str, str | int | bool] | None = None,
    ):
        self.mqtt = {**MQTT_DEFAULTS, **(mqtt or {})}
        self.binary = binary or find_nats_server()
        if self.binary is None:
            raise BrokerError("nats-server is not installed (apt-get install nats-server)")
        self.n, self.name = nodes, name
        self._tmp = tempfile.TemporaryDirectory(prefix="fedclip-nats-")
        self.dir = Path(self._tmp.name)
        self.ports = [{k: free_port() for k in ("client", "cluster", "mqtt", "http")} for _ in range(nodes)]
        self.procs: list[subprocess.Popen | None] = [None] * nodes
        for i in range(nodes):
            self._write_config(i)

    @property
    def mqtt_urls(self) -> list[str]:
        return [f"mqtt://{LOCALHOST}:{p['mqtt']}" for p in self.ports]

    def log_file(self, i: int) -> Path:
        return self.dir / f"n{i}.log"

    def _write_config(self, i: int) -> None:
        p = self.ports[i]
        routes = ", ".join(
            f'"nats-route://{LOCALHOST}:{q["cluster"]}"' for j, q in enumerate(self.ports) if j != i
        )
        (self.dir / f"n{i}").mkdir(exist_ok=True)
        mqtt = ", ".join(f"{k}: {json.dumps(v)}" for k, v in self.mqtt.items())
        conf = f"""
server_name: n{i}
listen: "{LOCALHOST}:{p["client"]}"
http: "{LOCALHOST}:{p["http"]}"
log_file: "{self.log_file(i)}"
max_payload: 8MB
jetstream {{ store_dir: "{self.dir / f"n{i}"}", max_memory_store: 256MB, max_file_store: 2GB }}
cluster {{ name: {self.name}, listen: "{LOCALHOST}:{p["cluster"]}", routes: [{routes}] }}
mqtt {{ listen: "{LOCALHOST}:{p["mqtt"]}", stream_replicas: {min(3, self.n)}, {mqtt} }}
"""
        (self.dir / f"n{i}.conf").write_text(conf)

    def start(self, timeout: float = 120) -> list[str]:
        """Start every node, then wait (one deadline for all) until each MQTT port is open and
        JetStream has a meta leader. The nodes start together because each one's MQTT gateway
        needs JetStream, which needs a quorum of the cluster: on a loaded 2-core machine one node
        alone can wait a long time for the others."""
        for i in range(self.n):
            self._spawn(i)
        deadline = time.monotonic() + timeout
        for i in range(self.n):
            self._wait_mqtt(i, deadline - time.monotonic())
        while time.monotonic() < deadline:  # MQTT needs JetStream, which needs a meta leader
            if self._jetstream_ready():
                return self.mqtt_urls
            time.sleep(0.2)
        self.stop()
        raise BrokerError(f"NATS cluster: JetStream not ready within {timeout:g}s (logs in {self.dir})")

    def _spawn(self, i: int) -> None:
        assert self.binary is not None  # checked when the cluster was made
        with open(self.dir / f"n{i}.stderr", "ab") as err:
            self.procs[i] = subprocess.Popen(
                [self.binary, "-c", str(self.dir / f"n{i}.conf")],
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )

    def _wait_mqtt(self, i: int, timeout: float) -> None:
        proc = self.procs[i]
        assert proc is not None  # spawned just before
        alive = lambda: proc.poll() is None  # noqa: E731
        if not wait_for_port(LOCALHOST, self.ports[i]["mqtt"], max(timeout, 0.1), alive):
            why = "exited" if proc.poll() is not None else f"MQTT port not open within {timeout:.0f}s"
            self.stop()
            raise BrokerError(f"NATS node n{i}: {why}: {self.last_error(i)} (logs in {self.dir})")

    def last_error(self, i: int) -> str:
        """The node's last error line (a port taken, a bad config), or its last line."""
        lines: list[str] = []
        for f in (self.log_file(i), self.dir / f"n{i}.stderr"):
            if f.exists():
                lines += f.read_text(errors="replace").splitlines()
        errors = [ln for ln in lines if "[ERR]" in ln or "[FTL]" in ln]
        return (errors or lines or ["(no log)"])[-1].strip()

    def _jetstream_ready(self) -> bool:
        for i, p in enumerate(self.ports):
            proc = self.procs[i]
            if proc is None or proc.poll() is not None:
                continue
            try:
                url = f"http://{LOCALHOST}:{p['http']}/jsz"
                with urllib.request.urlopen(url, timeout=2) as r:
                    info = json.load(r)
            except (OSError, ValueError):
                return False
            if not (info.get("meta_cluster") or {}).get("leader"):
                return False
        return True

    def pid(self, i: int) -> int | None:
        proc = self.procs[i]
        return proc.pid if proc is not None and proc.poll() is None else None

    def kill(self, i: int) -> None:
        """SIGKILL node i: no goodbye to its clients or routes, as a crashed machine."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            if proc is not None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)

    def cleanup(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
