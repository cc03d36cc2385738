"""The coordinator with real device agents (`fedclip-agent start` processes) over a real mosquitto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from fixtures_data import synthetic_images

from fedclip.coordinator.store import Store
from fedclip.sdk.manifest import Manifest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.mark.parametrize(
    "strategy,adapter,init",
    [
        ("ce-lora", "tri-lora", "ce-lora"),
        ("fedavg", "lora", "ce-lora"),
        ("fleet-core", "tri-lora", "frozen-seed"),
    ],
)
def test_two_rounds_with_real_agents(mosquitto, bundle_factory, tmp_path, strategy, adapter, init):
    bundle = bundle_factory(adapter=adapter, labels=("a", "b", "c"), init=init)
    manifest = Manifest.load(bundle)
    state = tmp_path / "coord"
    logs = []
    procs = []
    try:
        for n, (aid, mix) in enumerate((("cam1", {"a": 8, "b": 4}), ("cam2", {"b": 4, "c": 8}))):
            data = synthetic_images(tmp_path / "data" / aid, manifest.task.labels, mix, seed=n)
            log = open(tmp_path / f"{aid}.log", "wb")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedclip.device_agent.cli", "start", "--broker", mosquitto.url,
                 "--fleet", "e2e", "--id", aid, "--bundle", str(bundle), "--data", str(data),
                 "--state", str(tmp_path / "agents" / aid), "--threads", "1"],
                stdout=log, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        coord = subprocess.run(
            [sys.executable, "-m", "fedclip.coordinator.cli", "serve", "--broker", mosquitto.url,
             "--fleet", "e2e", "--bundle", str(bundle), "--state", str(state), "--strategy", strategy,
             "--rounds", "2",
             "--min-updates", "2", "--round-timeout", "240", "--local-epochs", "1", "--lr", "0.01"],
            capture_output=True, text=True, timeout=360,
        )  # fmt: skip
        agent_logs = "\n".join((tmp_path / f"{a}.log").read_text()[-1500:] for a in ("cam1", "cam2"))
        assert coord.returncode == 0, coord.stderr[-3000:] + agent_logs
    finally:
        for p in procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        for log in logs:
            log.close()
    with Store(state, readonly=True) as s:
        assert [r.state for r in s.rounds()] == ["aggregated", "aggregated"], s.rejections()
        for rnd in (1, 2):
            ups = s.updates(rnd)
            assert [u.agent for u in ups] == ["cam1", "cam2"]
            assert [u.num_samples > 0 for u in ups] == [True, True]
        assert s.rejections() == []
        heads = {v.version for v in s.versions()}
        if strategy in ("ce-lora", "fleet-core"):
            assert {"a-cam1-r2", "a-cam2-r2"} <= heads
        assert "g-r2" in heads
        agents = {a["agent"]: a for a in s.agents()}
        assert set(agents) == {"cam1", "cam2"}
    out = subprocess.run(
        [sys.executable, "-m", "fedclip.coordinator.cli", "status", "--state", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and "cam1" in out.stdout
