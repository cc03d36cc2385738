"""Rollouts to real `fedclip-agent start` processes, driven by `fedclip-coord rollout start --wait`.

Everything real: mosquitto, three agent processes (ONNX Runtime, Fashion-MNIST PNGs, their own state
dirs), the rollout CLI in its own process with its own key, database and MQTT session.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from fixtures_fleet import FLEET
from waiting import eventually

from fedclip.coordinator.fleet import parse_status
from fedclip.device_agent.state import read_record
from fedclip.sdk.adapters import save_adapter
from fedclip.sdk.mqtt import MqttSession
from fedclip.sdk.signing import ensure_keypair
from fedclip.sdk.wire import Topics

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(600)]
WAIT_S = 180


def _statuses(url: str, ids: set[str], cond, what: str) -> dict:
    """Wait until every agent's retained status satisfies `cond(info)`."""
    topics = Topics(FLEET)
    seen: dict = {}
    with MqttSession(url, f"watch-{time.monotonic_ns()}", clean_session=True) as s:
        s.subscribe(topics.all_agents("status"))

        def all_hold() -> bool:
            m = s.get(timeout=0.5)
            if m is not None:
                info = parse_status(topics, m.topic, m.payload)
                if info is not None:
                    seen[info.id] = info
            return ids <= set(seen) and all(cond(seen[i]) for i in ids)

        eventually(all_hold, WAIT_S, lambda: f"{what}: {seen}", interval=0)
    return seen


def rollout_cli(*args: str) -> subprocess.CompletedProcess:
    """`fedclip-coord rollout ARGS` in its own process (its own key, database and MQTT session)."""
    return subprocess.run(
        [sys.executable, "-m", "fedclip.coordinator.cli", "rollout", *args],
        env=dict(os.environ, COLUMNS="200"),
        capture_output=True,
        text=True,
        timeout=WAIT_S * 2,
    )


def wait_current(agents, version: str) -> None:
    """Every agent's state dir names `version` as the adapter inference uses."""
    eventually(
        lambda: all(read_record(a.state).get("current_adapter") == version for a in agents),
        WAIT_S,
        lambda: f"agents on {version}: {[read_record(a.state).get('current_adapter') for a in agents]}",
        interval=0.2,
    )


def test_real_agents_canary_promote_then_regression_rollback(mosquitto, tmp_path, world, agent_factory):
    ev, source = world
    state = tmp_path / "coord"
    _, pub = ensure_keypair(state / "keys")
    files = {}
    for v in ("good", "bad"):
        tensors, meta = source.load_for(v, "any")
        files[v] = save_adapter(tmp_path / f"{v}.safetensors", tensors, meta)
    ids = {"dev-1", "dev-2", "dev-3"}
    agents = [
        agent_factory(mosquitto.url, i, extra=("--coordinator-key", str(pub), "--group", "lab"))
        for i in sorted(ids)
    ]
    common = [
        "--state",
        str(state),
        "--broker",
        mosquitto.url,
        "--fleet",
        FLEET,
        "--stage-timeout",
        str(WAIT_S),
    ]

    cli = rollout_cli

    try:
        fleet = _statuses(mosquitto.url, ids, lambda a: a.online, "three online agents")
        assert all(a.groups == ("lab",) for a in fleet.values())

        r = cli("start", str(files["good"]), "--to", "group:lab", "--canary", "1", "--wait", *common)
        assert r.returncode == 0, r.stdout + r.stderr + agents[0].tail()
        assert "canary passed" in r.stdout and "complete" in r.stdout
        wait_current(agents, "good")

        r = cli(
            "start",
            str(files["bad"]),
            "--to",
            "all",
            "--canary",
            "1",
            "--max-regression",
            "1",
            "--wait",
            *common,
        )
        assert r.returncode == 1, r.stdout + r.stderr
        assert "rolled_back" in r.stdout and "exceeds --max-regression 1" in r.stdout
        wait_current(agents, "good")
        logs = "".join(a.text() for a in agents)
        assert "rolled back: bad -> good" in logs
    finally:
        for a in agents:
            a.terminate()
