"""A running fleet for the operator tests: `fedclip-coord serve --ops-port` in its own process over a
real mosquitto, with the scripted agents of test_coordinator (real MQTT, real wire messages) that
the test drives round by round, so it knows exactly what the coordinator stored."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from test_coordinator import FLEET, ScriptedAgent, wait_for

from fedclip.sdk.broker_ports import free_port
from fedclip.sdk.messages import DEVICE_FALLBACK
from fedclip.sdk.wire import Envelope, MsgType, encode

WAIT_S = 120.0  # generous: the suite shares 2 cores


def eventually(pred, what: str, timeout: float = WAIT_S):
    """`pred()`'s first truthy value, polled until the deadline (test_coordinator's `wait_for`)."""
    return wait_for(pred, timeout=timeout, what=what)


class GroupAgent(ScriptedAgent):
    """A scripted agent whose retained status names its groups and device, like a real agent's."""

    groups: tuple[str, ...] = ()

    def __init__(
        self,
        url: str,
        agent_id: str,
        bundle_id: str,
        groups: tuple[str, ...] = (),
        tuning: tuple[str, int, int] | None = None,
    ):
        self.groups = groups
        self.tuning = tuning  # (adapter, epoch, epochs): tuning that adapter (agent `personal:`)
        super().__init__(url, agent_id, bundle_id)

    def _status(self, state: str) -> bytes:
        body = {
            "state": state,
            "bundle_id": self.bundle_id,
            "adapter_version": "",
            "last_round": -1,
            "groups": list(self.groups),
            "device": {"arch": "x86_64", "provider": "CPUExecutionProvider"},
        }
        if self.tuning is not None:  # still tuning the adapter it uses: it serves the adapter itself
            body["adapter_version"] = self.tuning[0]
            body["tuning"] = dict(zip(("adapter", "epoch", "epochs"), self.tuning, strict=True))
        elif self.groups:  # serves its adapter tuned on the device (agent `personal:`) ...
            body["personal"] = {"accuracy": 0.7, "accuracy_fleet": 0.5, "mu": 1.5}
            body["device"] = {**body["device"], DEVICE_FALLBACK: "g-r0"}  # ... and the fleet's for its gate
        return encode(Envelope(MsgType.STATUS, FLEET, self.id, body=body))


def play_round(agents: list[ScriptedAgent], round_id: int, accuracy: float) -> None:
    """Every agent takes its task for `round_id` and sends an update reporting `accuracy`."""
    tasks = [a.task(round_id, timeout=WAIT_S) for a in agents]
    for a, t in zip(agents, tasks, strict=True):
        a.send(a.update(t, accuracy, num_samples=10))


class ServeWithOps:
    """`fedclip-coord serve ... --ops-port P` in its own process; `get(path)` talks to its endpoint."""

    def __init__(self, broker_url: str, bundle: Path, state: Path, log: Path, rounds: int, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedclip.coordinator.cli", "serve", "--broker", broker_url,
             "--fleet", FLEET, "--bundle", str(bundle), "--state", str(state), "--rounds", str(rounds),
             "--min-updates", "2", "--selection", "all", "--round-timeout", str(WAIT_S),
             "--ops-port", str(self.port), *extra],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def get(self, path: str, auth: tuple[str, str] | None = None) -> tuple[int, dict, bytes]:
        req = urllib.request.Request(self.url + path)
        if auth:
            req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    def wait_up(self, auth: tuple[str, str] | None = None) -> None:
        def up() -> bool:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            try:
                return self.get("/healthz", auth)[0] == 200
            except OSError:
                return False

        eventually(up, "the ops endpoint")

    def finish(self, timeout: float = WAIT_S) -> int:
        rc = self.proc.wait(timeout)
        self._log.close()
        return rc

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(30)
        self._log.close()


def scrape(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: dict, metric: str, /, **labels: str) -> float:
    return samples[(metric, frozenset(labels.items()))]
