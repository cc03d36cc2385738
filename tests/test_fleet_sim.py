"""The fleet simulator at small N: real mosquitto, the real `fedclip-coord serve`, 20 connections.

The fleet is provisioned, as the simulator runs by default: every agent has a startup kit, logs in
with its own broker password (mosquitto on the generated config) and signs its statuses and updates;
the coordinator counts only signed messages of enrolled agents."""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path

from tests.fixtures_broker import need_mosquitto

N = 20


def _fleet_sim():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fleet_sim.py"
    spec = importlib.util.spec_from_file_location("fleet_sim", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["fleet_sim"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_simulated_fleet_completes_two_rounds(bundle_factory, tmp_path):
    need_mosquitto()
    bundle = bundle_factory(adapter="tri-lora", labels=("a", "b", "c"))
    row = _fleet_sim().run(bundle, N, rounds=2, timeout=240, workdir=tmp_path, say=lambda *a: None)
    assert "error" not in row, row["error"]
    assert not row["coordinator_errors"], row["coordinator_errors"]
    assert row["signed"]
    assert "fleet is provisioned: only signed messages" in (tmp_path / "coordinator.log").read_text()
    phases = [p["phase"] for p in row["phases"]]
    assert phases[0] == "connect + status" and "r2 tasks out (personalized adapters)" in phases
    con = sqlite3.connect(tmp_path / "state" / "coordinator.sqlite")
    try:
        per_round = dict(con.execute("SELECT round, COUNT(*) FROM updates GROUP BY round"))
        rejected = con.execute("SELECT COUNT(*) FROM rejections").fetchone()[0]
        personal = con.execute("SELECT COUNT(*) FROM versions WHERE version LIKE 'a-sim%-r1'").fetchone()[0]
    finally:
        con.close()
    assert per_round == {1: N, 2: N}
    assert rejected == 0  # every status and update signed by an enrolled agent
    assert personal == N  # every agent got its personalized adapter, the start of its round-2 task
    # statistics travel once: round 2's updates carry the histogram and the digest only
    assert row["update_bytes_mean"]["2"] < row["update_bytes_mean"]["1"]


def test_report_puts_before_and_after_side_by_side(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import _sim_report

    def row(side: str, rep: int, status_s: float) -> dict:
        phases = [{"phase": "connect + status", "seconds": status_s, "coordinator_cpu_s": 0.5}]
        return {"agents": 1000, "side": side, "rep": rep, "phases": phases, "coordinator_cpu_s": 9.0}

    runs = [row("after", 1, 0.7), row("before", 1, 1.8), row("before", 2, 2.8), row("after", 2, 0.6)]
    data = {
        "meta": {},
        "rows": [],
        "ab": [{"meta": {"title": "Statuses", "how": "alternated"}, "runs": runs}],
    }
    text = _sim_report.write_report(data, tmp_path / "scale.md").read_text()
    assert "## Statuses" in text
    assert "| phase | before #1 | before #2 | after #1 | after #2 |" in text
    assert "| connect + status | 1.8 (0.5) | 2.8 (0.5) | 0.7 (0.5) | 0.6 (0.5) |" in text
