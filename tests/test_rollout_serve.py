"""`fedclip-coord serve` serves the bundle over HTTP, signs with its own key and drives rollouts.

Everything real: mosquitto, `serve` in its own process (waiting for agents on the tiny bundle, so it
never starts a round and only serves), the harness agents of test_rollout (real MqttSession,
RolloutClient, ONNX Runtime evaluation), `fedclip-coord rollout start` in its own process, and an
agent-side download of the bundle from the URL `serve` announces.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from fixtures_rollout import FLEET, HarnessAgent
from waiting import eventually

from fedclip.coordinator.rollout_store import COMPLETE, RolloutStore
from fedclip.sdk.adapters import save_adapter
from fedclip.sdk.fetch import fetch_bundle
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import MqttSession
from fedclip.sdk.signing import PUBLIC_KEY_NAME
from fedclip.sdk.wire import Topics, decode

WAIT_S = 120  # generous: the suite shares 2 cores

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]


def _coord(*args: str, timeout: float = WAIT_S * 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedclip.coordinator.cli", *args],
        env=dict(os.environ, COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _coordinator_status(url: str, cond) -> dict:
    """The retained coordinator status body, once `cond(body)` holds."""
    with MqttSession(url, f"probe-{time.monotonic_ns()}", clean_session=True) as s:
        s.subscribe(Topics(FLEET).coordinator_status, 1)

        def matching() -> dict | None:
            m = s.get(timeout=0.5)
            if m is None or not m.payload:
                return None
            body = decode(m.payload, fleet=FLEET).envelope.body
            return body if cond(body) else None

        return eventually(matching, WAIT_S, "the coordinator's status", interval=0)


def test_serve_serves_the_bundle_and_drives_rollouts(mosquitto, tmp_path, world, tiny_bundle):
    ev, source = world
    state, log_path = tmp_path / "coord", tmp_path / "serve.log"
    common = ["--state", str(state), "--broker", mosquitto.url, "--fleet", FLEET]
    log = open(log_path, "wb")
    serve = subprocess.Popen(
        [sys.executable, "-m", "fedclip.coordinator.cli", "serve", "--broker", mosquitto.url,
         "--fleet", FLEET, "--bundle", str(tiny_bundle), "--state", str(state), "--rounds", "1",
         "--min-updates", "5", "--round-timeout", "600"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    agents: list[HarnessAgent] = []
    try:
        body = _coordinator_status(mosquitto.url, lambda b: b.get("state") == "online")
        url = body["bundle_url"]
        assert url.startswith("http://127.0.0.1:")
        pub = state / "keys" / PUBLIC_KEY_NAME
        assert pub.is_file()

        # an agent fetches the bundle from the URL serve announces: every file checked by sha256
        fetched = fetch_bundle(url, tmp_path / "device-bundles", progress=False)
        bundle_id = Manifest.load(tiny_bundle).bundle_id
        assert fetched.name == bundle_id
        assert Manifest.load(fetched, verify=True).bundle_id == bundle_id

        agents = [
            HarnessAgent(mosquitto.url, n, tmp_path / "agents" / n, pub, ev).start() for n in ("a", "b", "c")
        ]
        eventually(lambda: all(a.session.connected.is_set() for a in agents), WAIT_S, "agents to connect")

        # 1. started from a file without --wait: the command ends at once and serve finishes it
        tensors, meta = source.load_for("good", "x")
        good = save_adapter(tmp_path / "good.safetensors", tensors, meta)
        r = _coord("rollout", "start", str(good), "--to", "all", "--canary", "0", *common)
        assert r.returncode == 0, r.stdout + r.stderr
        store = RolloutStore(state / "rollout.sqlite")
        try:
            eventually(lambda: store.get(1).state == COMPLETE, WAIT_S, "serve to complete rollout 1")
            assert all(a.version == "good" for a in agents)
            assert {a.agent for a in store.acks(1)} == {"a", "b", "c"}

            # 2. a registry version with a canary and --wait: the command and serve both drive it;
            # the stage decisions are taken once (the trained adapter is better, hence the margin)
            r = _coord(
                "rollout", "start", "g-r0", "--to", "all", "--canary", "1", "--max-regression", "100",
                "--stage-timeout", str(WAIT_S), "--wait", *common,
            )  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
            assert "complete" in r.stdout
            assert store.get(2).state == COMPLETE
            assert all(a.version == "g-r0" for a in agents)
            events = [text for _, text in store.events(2)]
            assert sum("canary passed" in t for t in events) == 1, events
            assert sum(t.startswith("rest: sent") for t in events) == 1, events
        finally:
            store.close()
    finally:
        for a in agents:
            a.stop()
        if serve.poll() is None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
        log.close()
    text = log_path.read_text()
    assert "coordinator public key" in text and url in text
