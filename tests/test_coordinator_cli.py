"""`fedclip-coord status` and `fedclip-coord adapters`, on a state dir written by the real store."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from fedclip.coordinator.config import CoordConfig
from fedclip.coordinator.metrics import (
    MetricsLog,
    fleet_gain_shares,
    fleet_gain_warning,
    plot,
    weighted_means,
)
from fedclip.coordinator.registry import Registry
from fedclip.coordinator.store import Store
from fedclip.coordinator.store.rows import agent_values
from fedclip.coordinator.strategies.base import AggregateResult
from fedclip.sdk.adapters import load_adapter
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.messages import FLEET_GAIN, FLEET_GAIN_HELPED, FLEET_GAIN_HURT


def _coord(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedclip.coordinator.cli", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    t0 = {"x.lora_C": np.eye(2, dtype=np.float32)}
    with Store(d) as s:
        s.set_meta("fleet", "f1")
        s.set_meta("bundle_id", "b" * 64)
        s.set_meta("strategy", "ce-lora")
        s.upsert_agents(
            [agent_values("cam1", True, "b" * 64, "a-cam1-r1", 1, {"device": {"cpu": "x86"}}, time.time())]
        )
        s.upsert_agents([agent_values("cam2", False, "b" * 64, "", -1, {}, time.time())])
        reg = Registry(s, "b" * 64, "tri-lora")
        reg.ensure_initial(t0, "ce-lora")
        s.start_round(1, "ce-lora", 1.0, [("cam1", "g-r0", "t")])
        res = AggregateResult({"x.lora_C": 2 * t0["x.lora_C"]}, {"cam1": {"x.lora_C": 3 * t0["x.lora_C"]}})
        reg.commit_round(
            1,
            "ce-lora",
            res,
            {"cam1": "g-r0"},
            {"cam1": {"accuracy": 0.75, "loss": 0.5}},
            {"accuracy": 0.75, "loss": 0.5},
        )
    log = MetricsLog(d / "metrics.jsonl")
    log.append(
        {
            "round": 1,
            "state": "aggregated",
            "metrics": {"accuracy": 0.75, "loss": 0.5},
            "agents": {"cam1": {"accuracy": 0.75, "loss": 0.5}},
        }
    )
    log.append({"round": 2, "state": "failed"})
    log.append(
        {
            "round": 3,
            "state": "aggregated",
            "metrics": {"accuracy": 0.8, "loss": 0.4},
            "agents": {"cam1": {"accuracy": 0.8, "loss": 0.4}},
        }
    )
    return d


def test_status_shows_the_fleet_and_plots(state, tmp_path):
    out = _coord("status", "--state", str(state), "--plot", str(tmp_path / "m.png"))
    assert out.returncode == 0, out.stderr
    assert "cam1" in out.stdout and "cam2" in out.stdout and "a-cam1-r1" in out.stdout
    assert "accuracy=0.75" in out.stdout and "g-r1" in out.stdout
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_on_a_missing_state_dir_is_a_one_line_error(tmp_path):
    out = _coord("status", "--state", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "no coordinator state" in out.stderr


def test_adapters_list_show_export(state, tmp_path):
    out = _coord("adapters", "list", "--state", str(state))
    assert out.returncode == 0, out.stderr
    for v in ("g-r0", "g-r1", "a-cam1-r1"):
        assert v in out.stdout
    shown = json.loads(_coord("adapters", "show", "a-cam1-r1", "--state", str(state)).stdout)
    assert (
        shown["parent"] == "g-r0"
        and shown["agent"] == "cam1"
        and shown["tensors"]["x.lora_C"]["shape"] == [2, 2]
    )
    dest = tmp_path / "cam1.safetensors"
    out = _coord("adapters", "export", "a-cam1-r1", "--out", str(dest), "--state", str(state))
    assert out.returncode == 0, out.stderr
    tensors, meta = load_adapter(dest)
    np.testing.assert_array_equal(tensors["x.lora_C"], 3 * np.eye(2, dtype=np.float32))
    assert meta.version == "a-cam1-r1" and meta.round == 1 and meta.strategy == "ce-lora"
    bad = _coord("adapters", "show", "g-r9", "--state", str(state))
    assert bad.returncode == 2 and "not in the registry" in bad.stderr


def test_serve_config_errors_name_the_field(tmp_path):
    cfg = tmp_path / "coord.yaml"
    cfg.write_text("broker: mqtt://127.0.0.1:1\nfleet: f\nbundle: b\nstate: s\nstrategy: fedsgd\n")
    out = _coord("serve", "--config", str(cfg))
    assert out.returncode == 2 and "unknown strategy 'fedsgd'" in out.stderr
    with pytest.raises(ConfigError, match="clients_per_round"):
        CoordConfig.load(
            None,
            dict(broker="mqtt://h", fleet="f", bundle="b", state="s", clients_per_round=1, min_updates=2),
        )
    with pytest.raises(ConfigError, match="min_updates"):
        CoordConfig.load(None, dict(broker="mqtt://h", fleet="f", bundle="b", state="s", min_updates=0))
    cfg.write_text("broker: mqtt://127.0.0.1:1\nfleet: f\nbundle: b\nstate: s\nrounds: 3\n")
    c = CoordConfig.load(cfg, {"rounds": 5, "lr": None})
    assert c.rounds == 5 and c.mqtt_client_id == "fedclip-coord-f"


def test_fleet_gain_shares_count_only_the_agents_that_report_one():
    per_agent = {"a": {FLEET_GAIN: 0.1}, "b": {FLEET_GAIN: -0.2}, "c": {FLEET_GAIN: 0.0}, "d": {"acc": 1.0}}
    # of a, b and c: a helped, b hurt, c level (no held-out answer changed)
    assert fleet_gain_shares(per_agent) == {
        FLEET_GAIN_HELPED: pytest.approx(1 / 3),
        FLEET_GAIN_HURT: pytest.approx(1 / 3),
    }
    assert fleet_gain_shares({"d": {"acc": 1.0}}) == {}  # no agent of an earlier version divides by 0


def test_the_serve_log_warns_when_the_fleet_costs_more_agents_than_it_helps():
    costly = {FLEET_GAIN: -0.079, FLEET_GAIN_HELPED: 0.0, FLEET_GAIN_HURT: 0.5}
    line = fleet_gain_warning(3, costly, personalized=False)
    assert line == (
        "round 3: the adapter the fleet sent scored 7.9 points below what the agents had trained "
        "themselves (it helped 0% of them and cost 50%); a personalized strategy (fleet-lora, ce-lora) "
        "hands each device back its own fit (docs/aggregation.md)"
    )
    assert "personalized strategy" not in fleet_gain_warning(3, costly, personalized=True)
    fine = (
        {FLEET_GAIN: 0.01, FLEET_GAIN_HELPED: 0.25, FLEET_GAIN_HURT: 0.0},  # a gain
        {FLEET_GAIN: -0.01, FLEET_GAIN_HELPED: 0.25, FLEET_GAIN_HURT: 0.25},  # as many helped as hurt
        {FLEET_GAIN: -0.01, FLEET_GAIN_HELPED: 0.5},  # a coordinator's older record
        {},
    )
    for metrics in fine:
        assert fleet_gain_warning(3, metrics, personalized=False) is None, metrics
    # a device that claims an absurd gain (the wire takes any finite number) moves the mean, not the
    # shares, and the line stays one line
    shares = fleet_gain_shares({"liar": {FLEET_GAIN: -1e308}, "b": {FLEET_GAIN: 0.1}, "c": {FLEET_GAIN: 0.2}})
    assert shares == {FLEET_GAIN_HELPED: pytest.approx(2 / 3), FLEET_GAIN_HURT: pytest.approx(1 / 3)}
    line = fleet_gain_warning(4, {FLEET_GAIN: -1e308, FLEET_GAIN_HELPED: 0.0, FLEET_GAIN_HURT: 1.0}, True)
    assert line is not None and "\n" not in line and line.startswith("round 4: ")


def test_the_metrics_plot_has_a_fleet_gain_panel_when_rounds_report_one(tmp_path):
    def panels(records) -> int:  # 2.6 inches a panel at 100 dpi: the PNG's height (IHDR) counts them
        png = plot(records, tmp_path / "m.png").read_bytes()
        return round(int.from_bytes(png[20:24], "big") / 260)

    rnd = {"round": 1, "state": "aggregated", "metrics": {"accuracy": 0.5, "steps": 3.0}, "agents": {}}
    assert panels([rnd]) == 1  # accuracy; steps is not drawn by default
    gained = {**rnd, "round": 2, "metrics": {"accuracy": 0.6, FLEET_GAIN: -0.02, FLEET_GAIN_HELPED: 0.0}}
    assert panels([rnd, gained]) == 2  # and the fleet gain


def test_weighted_means_and_plot_refuses_empty(tmp_path):
    m = weighted_means({"a": {"acc": 1.0}, "b": {"acc": 0.0, "loss": 2.0}}, {"a": 3, "b": 1})
    assert m == {"acc": 0.75, "loss": 2.0}
    with pytest.raises(ConfigError, match="no aggregated round"):
        plot([{"round": 1, "state": "failed"}], tmp_path / "x.png")
