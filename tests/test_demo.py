"""`fedclip-coord demo` and the process group it runs on.

The end-to-end tests start the real command in a subprocess: embedded amqtt broker, real export,
partition, coordinator and agent processes. Leftover processes are found by the run's unique folder,
which every child carries in its command line (state dirs, data dirs), so the check does not depend
on who the parent is after the demo has exited.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from rich.console import Console
from waiting import eventually

from fedclip.coordinator.demo import (
    COLUMNS,
    DEFAULT_STRATEGY,
    SETS,
    STRATEGY_BUNDLE,
    Comparison,
    DemoConfig,
    FleetRun,
    build_report,
    columns,
    final_adapter,
    final_fallback,
    plot_accuracy,
    read_partition,
    report_tables,
    resolve_dataset,
    round_records,
    write_markdown,
)
from fedclip.coordinator.metrics import METRICS_FILE, MetricsLog
from fedclip.coordinator.procs import ChildFailed, ProcessGroup, port_is_free, wait_port_free
from fedclip.coordinator.registry import agent_version, global_version
from fedclip.sdk.adapters import load_adapter
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.ledger import Installed, Ledger, installed
from fedclip.sdk.messages import FLEET_GAIN

REPO = Path(__file__).resolve().parents[1]


def _procs_mentioning(marker: str) -> list[psutil.Process]:
    me = os.getpid()
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.info["pid"] != me and any(marker in a for a in (p.info["cmdline"] or [])):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _alive(marker: str) -> list[psutil.Process]:
    return [p for p in _procs_mentioning(marker) if p.status() != psutil.STATUS_ZOMBIE]


def _wait_gone(marker: str, timeout_s: float = 15.0) -> None:
    eventually(
        lambda: not _alive(marker), timeout_s, lambda: f"these to exit: {_alive(marker)}", interval=0.2
    )


def _round_in_progress(out: Path) -> bool:
    """Some agent under `out` has a round in progress (its state.json names one)."""
    for path in out.rglob("state.json"):
        try:
            if json.loads(path.read_text()).get("in_progress"):
                return True
        except (OSError, ValueError):  # the agent may be creating it; state.json is replaced atomically
            continue
    return False


# ---- process group -------------------------------------------------------------------------------
def _sleeper(marker: str) -> list[str]:
    """A process that sleeps and carries `marker` in its command line (coreutils sleep refuses it)."""
    return [sys.executable, "-c", "import time; time.sleep(300)", marker]


def test_process_group_stops_children_and_grandchildren(tmp_path):
    marker = f"fedclip-test-{os.getpid()}-{time.monotonic_ns()}"
    with ProcessGroup(log_dir=tmp_path / "logs") as procs:
        # A shell that forks a grandchild: only a group kill reaches the grandchild.
        py = " ".join(_sleeper(marker)[:2]) + ' "import time; time.sleep(300)" ' + marker
        procs.spawn("shell", ["sh", "-c", f"{py} & {py}; wait", marker])
        procs.spawn("sleeper", _sleeper(marker))
        # shell, its two children, the sleeper
        eventually(lambda: len(_procs_mentioning(marker)) == 4, 10, "the four processes to start")
        for c in procs.children:
            assert os.getpgid(c.pid) == c.pid  # own process group
    _wait_gone(marker)


def test_process_group_reports_a_dead_child_with_its_log(tmp_path):
    with ProcessGroup(log_dir=tmp_path / "logs") as procs:
        child = procs.spawn("crasher", [sys.executable, "-c", "import sys; print('boom-123'); sys.exit(3)"])
        child.proc.wait(10)
        with pytest.raises(ChildFailed, match=r"crasher exited with code 3[\s\S]*boom-123"):
            procs.check()
        procs.check(allow_exit=("crasher",))  # an expected exit is not an error


def test_process_group_run_returns_stdout_and_raises_on_failure(tmp_path):
    with ProcessGroup(log_dir=tmp_path / "logs") as procs:
        out = procs.run("ok", [sys.executable, "-c", "print('{\"a\": 1}')"], timeout_s=30, capture=True)
        assert json.loads(out) == {"a": 1}
        with pytest.raises(ChildFailed, match="bad failed with exit code 4"):
            procs.run("bad", [sys.executable, "-c", "import sys; sys.exit(4)"], timeout_s=30)
        with pytest.raises(ChildFailed, match="did not finish"):
            procs.run("slow", ["sleep", "30"], timeout_s=0.5)


def test_children_die_with_a_killed_parent(tmp_path):
    """A parent killed with SIGKILL runs no cleanup; the kernel's parent-death signal stops the child."""
    marker = f"fedclip-orphan-{os.getpid()}-{time.monotonic_ns()}"
    script = textwrap.dedent(
        f"""
        import os, signal, time
        from pathlib import Path
        from fedclip.coordinator.procs import ProcessGroup
        g = ProcessGroup(log_dir=Path({str(tmp_path)!r}))
        g.spawn("sleeper", {_sleeper(marker)!r})
        print("ready", flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        eventually(lambda: _procs_mentioning(marker), 10, "the child to start")
        parent.kill()
        parent.wait(10)
        _wait_gone(marker)
    finally:
        parent.kill()
        parent.wait(10)


def test_port_helpers():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert not port_is_free(port)
        assert not wait_port_free(port, timeout_s=0.2)
    assert wait_port_free(port, timeout_s=5)


# ---- pieces of the demo --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field,value,match",
    [
        ("strategy", "fedprox", "--strategy"),
        ("shift", "sideways", "--shift"),
        ("dirichlet", 0.0, "--dirichlet"),
        ("lr", -1.0, "--lr"),
        ("lr", float("nan"), "--lr"),
        ("lr", float("inf"), "--lr"),
        ("lr", 1e30, "--lr"),
        ("local_epochs", 10**30, "--local-epochs"),
        ("rank", 0, "--rank"),
        ("bundle", Path("/nonexistent/bundle"), "--bundle"),
        ("base", "warm", "--base"),
        ("base_steps", 0, "--base-steps"),
        ("loss", "focal", "--loss"),
        ("personal_mu", -1.0, "--personal-mu"),
        ("personal_mu", float("nan"), "--personal-mu"),
        ("personal_mu", 1e9, "--personal-mu"),
        ("open_set_q", -0.1, "--open-set-quantile"),
        ("open_set_q", 0.5, "--open-set-quantile"),
        ("open_set_q", float("nan"), "--open-set-quantile"),
    ],
)
def test_demo_config_rejects_bad_values(field, value, match):
    with pytest.raises(ConfigError, match=match):
        DemoConfig(**{field: value})


def test_the_gated_column_is_on_by_default_where_there_is_a_prior():
    """The gate decides where the label prior applies: with plain CE there is none, so no column."""
    assert DemoConfig().gated and columns(DemoConfig()) == (*COLUMNS, "gated")
    assert not DemoConfig(loss="ce").gated and columns(DemoConfig(loss="ce")) == COLUMNS
    assert columns(DemoConfig(open_set_q=0.0, personal_mu=1.5)) == (*COLUMNS, "personal")


def test_no_fallback_for_an_agent_without_a_ledger_or_an_adapter(tmp_path):
    """An agent that never started (no ledger) or never installed an adapter: its gate has the bundle's
    own model only, and the comparison goes on."""
    run = FleetRun(rounds=[{"round": 1}], agent_states={"a": tmp_path / "nothing-here"})
    assert final_adapter(run, "a", 1) is None
    assert final_fallback(run, "a", None) is None
    assert final_fallback(run, "a", tmp_path / "x.safetensors") is None


def test_every_coordinator_strategy_has_its_bundle():
    """--strategy takes every strategy `serve` knows, and exports the adapters it needs."""
    from fedclip.coordinator import strategies

    assert sorted(STRATEGY_BUNDLE) == strategies.names()
    assert DEFAULT_STRATEGY in STRATEGY_BUNDLE
    core = DemoConfig(strategy="fleet-core")  # mixes cores over shared frozen A and B
    assert (core.adapter, core.init) == ("tri-lora", "frozen-seed")
    assert (DemoConfig(strategy="fedavg").adapter, DemoConfig(strategy="fedavg").init) == ("lora", None)


def test_the_strategy_sets_rank_alpha_and_lr_unless_given():
    """fleet-core trains only r x r cores over a frozen basis: rank 6 and 30x LoRA's lr unless the
    command line says otherwise; alpha follows the rank (alpha / r = 2) unless given."""
    core = DemoConfig(strategy="fleet-core")
    assert (core.rank, core.alpha, core.lr) == (6, 12.0, 0.15)
    for strategy in ("ce-lora", "fedavg", "fleet-lora", "trimmed-mean"):
        cfg = DemoConfig(strategy=strategy)
        assert (cfg.rank, cfg.alpha, cfg.lr) == (4, 8.0, 5e-3), strategy
    given = DemoConfig(strategy="fleet-core", rank=4, lr=0.05)
    assert (given.rank, given.alpha, given.lr) == (4, 8.0, 0.05)
    assert DemoConfig(strategy="fleet-core", alpha=3.0).alpha == 3.0


def test_auto_dataset_prefers_fashion_mnist():
    from fedclip.sdk.partition import FASHION_MNIST_DIR

    expected = "fashion-mnist" if (FASHION_MNIST_DIR / "train-labels-idx1-ubyte.gz").exists() else "digits"
    assert resolve_dataset("auto") == expected
    assert resolve_dataset("imagefolder:/x") == "imagefolder:/x"


def test_round_records_keep_aggregated_rounds_and_skip_torn_lines(tmp_path):
    lines = [
        {"round": 1, "state": "aggregated", "metrics": {"accuracy_after": 0.5}},
        {"round": 2, "state": "failed"},
        {"round": 2, "state": "aggregated", "metrics": {}},
    ]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"round": 3, "sta'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert [r["round"] for r in round_records(tmp_path)] == [1, 2]


def test_read_partition_falls_back_to_folders(tmp_path):
    for a in ("agent-0", "agent-1"):
        (tmp_path / a / "train" / "cat").mkdir(parents=True)
    (tmp_path / "partition.json").write_text(json.dumps({"labels": ["cat", "dog"]}))
    assert read_partition(tmp_path) == (["cat", "dog"], ["agent-0", "agent-1"])


def test_report_files(tmp_path):
    cfg = DemoConfig(out=tmp_path, agents=2, rounds=2, open_set_q=0.0)
    run = FleetRun(
        rounds=[
            {"round": 1, "state": "aggregated", "seconds": 3.0, "uplink_bytes": 1000, "downlink_bytes": 2000},
            {"round": 2, "state": "aggregated", "seconds": 2.5, "uplink_bytes": 1000, "downlink_bytes": 2000},
        ],
        seconds=5.5,
    )
    acc = {"a": [0.1, 0.3, 0.5], "b": [0.2, 0.2, 0.4]}
    table = {
        "own": {
            "a": {"zero_shot": 0.1, "local_only": 0.45, "federated": 0.5},
            "b": {"zero_shot": 0.2, "local_only": 0.3, "federated": 0.4},
        },
        "all_class": {
            "a": {"zero_shot": 0.3, "local_only": 0.2, "federated": 0.35},
            "b": {"zero_shot": 0.3, "local_only": None, "federated": 0.25},  # None: an eval that is missing
        },
    }
    comparison = Comparison(acc, table, {"a": 0.4, "b": 0.5})
    report = build_report(cfg, "digits", ["0", "1"], run, acc, 9.0, comparison=comparison)
    assert report["mean_accuracy_before"] == pytest.approx(0.15)
    assert report["mean_accuracy_after"] == pytest.approx(0.45)
    assert report["bytes_total"] == 6000
    assert report["agents"]["a"]["own"] == table["own"]["a"]
    assert report["mean"]["own"]["local_only"] == pytest.approx(0.375)
    assert report["mean"]["all_class"]["local_only"] == pytest.approx(0.2)  # of the agents that have one
    assert report["local_only"]["epochs"] == 2 and report["local_only"]["train_seconds"] == {
        "a": 0.4,
        "b": 0.5,
    }
    write_markdown(report, tmp_path / "report.md")
    md = (tmp_path / "report.md").read_text()
    assert "| a | 10.0% | 45.0% | 50.0% | 30.0% | 20.0% | 35.0% |" in md
    assert "| b | 20.0% | 30.0% | 40.0% | 30.0% | - | 25.0% |" in md
    assert "own +7.5, all-class +10.0" in md  # fedclip minus local-only, mean points
    plot_accuracy(report, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The default open-set gate and --personal-mu: two more columns, in the mean, the tables, the gains
    # and the plot, and what the gates did.
    more = {"gated": {"own": {"a": 0.4, "b": 0.3}, "all_class": {"a": 0.5, "b": 0.35}},
            "personal": {"own": {"a": 0.6, "b": 0.35}, "all_class": {"a": 0.4, "b": 0.3}}}  # fmt: skip
    for name, rows in table.items():
        for aid, row in rows.items():
            row.update({column: more[column][name][aid] for column in more})
    gate = {
        "a": {
            "fallback": "g-r2",
            "sent_away": {"own": 1, "all_class": 8},
            "images": {"own": 10, "all_class": 20},
        },
        "b": {  # its final rollout did not reach it: its gate sends images to the bundle's own model
            "fallback": None,
            "sent_away": {"own": 0, "all_class": 4},
            "images": {"own": 10, "all_class": 20},
        },
    }
    tuned = build_report(DemoConfig(out=tmp_path, agents=2, rounds=2, personal_mu=1.5), "digits", ["0", "1"],
                         run, acc, 9.0, comparison=Comparison(acc, table, gate=gate))  # fmt: skip
    assert tuned["mean"]["own"]["personal"] == pytest.approx(0.475)
    assert tuned["mean"]["all_class"]["gated"] == pytest.approx(0.425)
    assert tuned["agents"]["a"]["open_set"] == gate["a"]
    assert tuned["open_set"]["sent_away_share"] == pytest.approx({"own": 0.05, "all_class": 0.3})
    assert (tuned["open_set"]["fallbacks"], tuned["open_set"]["to_base"]) == ({"g-r2": 1}, 1)
    write_markdown(tuned, tmp_path / "tuned.md")
    md = (tmp_path / "tuned.md").read_text()
    assert "| a | 10.0% | 45.0% | 50.0% | 40.0% | 60.0% | 30.0% | 20.0% | 35.0% | 50.0% | 40.0% |" in md
    assert "fedclip + gate (q 0.05) minus local-only (mean, points): own -2.5, all-class +22.5." in md
    assert (
        "fedclip + personal tuning (mu 1.5) minus local-only (mean, points): own +10.0, all-class +15.0."
        in md
    )
    assert "sent 5% of the own images, 30% of the all-class images away from the label prior, to the " \
           "fleet's adapter g-r2 (1 agent) and the bundle's own model (1 agent)" in md  # fmt: skip
    # The terminal's tables fit 80 columns (they also go to logs and CI output): no header cut short.
    console = Console(width=80, record=True, file=io.StringIO())
    for t in report_tables(tuned):
        console.print(t)
    text = console.export_text()
    assert "fedclip + gate" in text and "personal" in text and "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    plot_accuracy(tuned, tmp_path / "tuned.png")
    assert (tmp_path / "tuned.png").stat().st_size > 0
    # Plain CE: no prior, so no gate to score, and the report says why the column is missing.
    ce = build_report(
        DemoConfig(out=tmp_path, agents=2, rounds=2, loss="ce"), "digits", ["0", "1"], run, acc, 9.0
    )
    assert any("no open-set gate" in n for n in ce["notes"]), ce["notes"]
    assert not any("gate" in n for n in report["notes"])  # --open-set-quantile 0: off, nothing to say
    # A report without the comparison (what benchmarks build) still renders: before/after only.
    plain = build_report(cfg, "digits", ["0", "1"], run, acc, 9.0)
    write_markdown(plain, tmp_path / "plain.md")
    assert "| a | 10.0% | 50.0% |" in (tmp_path / "plain.md").read_text()
    plot_accuracy(plain, tmp_path / "plain.png")
    assert (tmp_path / "plain.png").stat().st_size > 0


def test_bad_flag_is_one_line_error_and_starts_nothing(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedclip.coordinator.cli",
            "demo",
            "--strategy",
            "nope",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "--strategy" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


# ---- the whole job ---------------------------------------------------------------------------------
TINY = ["--agents", "2", "--rounds", "2", "--per-agent", "60", "--round-timeout", "120", "--timeout", "600"]


def _demo_argv(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fedclip.coordinator.cli", "demo", *TINY, "--out", str(out), *extra]


def _check_comparison(report: dict, columns: tuple[str, ...] = COLUMNS) -> None:
    """Every agent has zero-shot, local-only and federated accuracy (and `columns`' others) on its own
    split and all-class set."""
    for aid, a in report["agents"].items():
        for name in SETS:
            assert set(a[name]) == set(columns), (aid, name, a[name])
            for column, acc in a[name].items():
                assert isinstance(acc, float) and 0.0 <= acc <= 1.0, (aid, name, column, acc)
        assert a["own"]["zero_shot"] == a["accuracy_before"] and a["own"]["federated"] == a["accuracy_after"]
    for name in SETS:
        for column in columns:
            assert 0.0 <= report["mean"][name][column] <= 1.0
    assert set(report["local_only"]["train_seconds"]) == set(report["agents"])


def _final(report: dict, agent: str) -> Installed:
    """What an agent of a demo run serves inference with at the end (`sdk.ledger.installed`)."""
    return installed(Path(report["run_dir"]) / "agents" / agent)


def _final_prior(report: dict, agent: str) -> tuple[float, ...]:
    """The label prior on the adapter an agent of a demo run ended with (its inference adds it)."""
    ledger = Ledger.read(Path(report["run_dir"]) / "agents" / agent)
    final = ledger.entry(ledger.current)
    assert final is not None, agent
    return load_adapter(final.file)[1].label_prior


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_end_to_end(tmp_path):
    from fedclip.coordinator.demo.launch import fashion_mnist_installed

    out = tmp_path / "demo"
    # A few pretraining steps into a fresh cache: the first run makes the base, the second reuses it.
    base = ["--base-steps", "3", "--base-cache", str(tmp_path / "base")]
    r = subprocess.run(_demo_argv(out, *base), capture_output=True, text=True, timeout=800, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "report.md").is_file()
    assert len(report["agents"]) == 2
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    for a in report["agents"].values():
        assert len(a["accuracy_per_round"]) == 3
        for acc in a["accuracy_per_round"]:
            assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    # balanced softmax by default, so the open-set gate's column too (ce-lora: no fleet's adapter beside
    # each agent's own, so the gate sends its images to the bundle's own model)
    _check_comparison(report, (*COLUMNS, "gated"))
    assert report["open_set"]["quantile"] == 0.05
    assert (report["open_set"]["fallbacks"], report["open_set"]["to_base"]) == ({}, 2)
    every_label = len(report["labels"]) * report["config"]["all_class_per_label"]
    for a in report["agents"].values():
        assert a["open_set"]["images"]["all_class"] == every_label and a["open_set"]["fallback"] is None
    assert report["open_set"]["sent_away_share"]["all_class"] > 0  # unseen labels do leave the prior
    assert "fedclip + gate (q 0.05) minus local-only" in r.stdout
    if fashion_mnist_installed():
        # The pretrained base, and agents cut from the test set only (none holds a pretraining image).
        assert report["base"]["kind"] == "pretrained" and report["base"]["cached"] is False
        assert report["config"]["pretrained"] == report["base"]["weights"]
        assert report["dataset"] == "fashion-mnist-test"
    assert report["bytes_total"] > 0
    # Round 2's fleet gain: each agent's adapter from the fleet against its own of round 1, on the
    # same held-out images (round 1 had nothing of its own to compare with)
    first, second = report["rounds"]
    assert first["fleet_gain"] is None
    assert 0.0 <= second["fleet_gain_helped"] <= 1.0 and 0.0 <= second["fleet_gain_hurt"] <= 1.0
    kept = MetricsLog(Path(report["run_dir"]) / "coordinator" / METRICS_FILE).read()
    agents = {rec["round"]: rec["agents"] for rec in kept if rec.get("state") == "aggregated"}
    for aid, m in agents[2].items():
        assert m[FLEET_GAIN] == pytest.approx(m["accuracy_before"] - agents[1][aid]["accuracy_after"])
    assert "fleet gain" in r.stdout
    # The last round's adapters reached every agent by signed rollout (agents hold the coordinator key).
    assert not [n for n in report["notes"] if "did not reach" in n], report["notes"]
    assert "agent-00" in r.stdout and "total" in r.stdout and "local-only" in r.stdout  # the tables
    _wait_gone(str(out))
    port = int(re.search(r"127\.0\.0\.1:(\d+)", r.stdout).group(1))
    assert port_is_free(port)

    # The default loss is balanced softmax: the adapters the agents end with carry their label prior.
    assert report["config"]["loss"] == "balanced-softmax"
    assert any("balanced softmax" in n for n in report["notes"]), report["notes"]
    assert all(_final_prior(report, a) for a in report["agents"])
    # ce-lora personalizes, each agent its own A and B: no global adapter travels beside its own
    assert all(_final(report, a).fallback is None for a in report["agents"])

    # A second run into the same folder needs no cleanup, and reuses the base; with --personal-mu
    # each agent's final adapter is also tuned on its own images (`fedclip-agent train --prox-mu`)
    # and scored as one more column.
    argv = _demo_argv(out, "--rounds", "1", "--personal-mu", "1.5", "--strategy", "fleet-lora", *base)
    r2 = subprocess.run(argv, capture_output=True, text=True, timeout=800)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    assert len(list((out / "runs").iterdir())) == 2
    report2 = json.loads((out / "report.json").read_text())
    assert len(report2["rounds"]) == 1
    _check_comparison(report2, (*COLUMNS, "gated", "personal"))
    assert "fedclip + personal tuning (mu 1.5) minus local-only" in (out / "report.md").read_text()
    tuned = sorted((Path(report2["run_dir"]) / "personal").glob("*.safetensors"))
    assert [p.stem for p in tuned] == sorted(report2["agents"])
    assert all(load_adapter(p)[1].strategy == "personal" for p in tuned)
    # fleet-lora: each agent's own adapter and, beside it, the round's global one (`--fallback`;
    # real agents: checked against the bundle and completed as their own adapter is)
    for agent in report2["agents"]:
        now = _final(report2, agent)
        assert now.version.startswith(agent_version(agent, 1)) and now.fallback is not None, (agent, now)
        assert load_adapter(now.fallback)[1].version == global_version(1)
        assert set(load_adapter(now.fallback)[0]) == set(load_adapter(now.file)[0])
    # ... and the gated column's gates sent the images unlike an agent's own to that one
    assert report2["open_set"]["fallbacks"] == {global_version(1): 2} and report2["open_set"]["to_base"] == 0
    assert all(a["open_set"]["fallback"] == global_version(1) for a in report2["agents"].values())
    if fashion_mnist_installed():
        assert report2["base"]["cached"] is True and report2["base"]["weights"] == report["base"]["weights"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_ctrl_c_stops_everything(tmp_path):
    out = tmp_path / "demo"
    log = tmp_path / "demo.out"
    with open(log, "w") as f:
        # Random weights: this test is about stopping, not about the base (test_demo_end_to_end makes one).
        argv = _demo_argv(out, "--rounds", "50", "--base", "random")
        demo = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT)
    try:
        # Wait until the fleet is up: both agents and the coordinator are running.
        def fleet_up() -> bool:
            assert demo.poll() is None, log.read_text()[-3000:]
            cmds = [" ".join(p.info["cmdline"] or []) for p in _procs_mentioning(str(out))]
            agents = sum("fedclip.device_agent.cli start" in c for c in cmds)
            return agents == 2 and any(" serve " in c for c in cmds)

        eventually(fleet_up, 400, lambda: f"the fleet to come up: {log.read_text()[-3000:]}", interval=0.5)
        # Mid-round: an agent has recorded a round in progress in its state dir.
        eventually(lambda: _round_in_progress(out), 400, "an agent to start a round", interval=0.2)
        demo.send_signal(signal.SIGINT)
        rc = demo.wait(60)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait(10)
    text = log.read_text()
    assert rc in (0, 130), text[-3000:]
    assert "interrupted" in text
    _wait_gone(str(out))
    port = int(re.search(r"127\.0\.0\.1:(\d+)", text).group(1))
    assert wait_port_free(port, timeout_s=10)


def test_given_bundle_must_fit_strategy_and_labels(bundle_factory):
    from fedclip.coordinator.demo import check_bundle

    lora = bundle_factory(adapter="lora", labels=("a", "b", "c"))
    cfg = DemoConfig(strategy="fedavg", bundle=lora)
    assert check_bundle(cfg, lora, ["a", "b", "c"]) == lora
    with pytest.raises(ConfigError, match="needs tri-lora"):
        check_bundle(DemoConfig(strategy="ce-lora", bundle=lora), lora, ["a", "b", "c"])
    with pytest.raises(ConfigError, match="labels"):
        check_bundle(cfg, lora, ["x", "y", "z"])
    # fleet-core mixes cores over A and B every agent shares: a ce-lora-init tri-lora bundle will not do.
    tri = bundle_factory(adapter="tri-lora", labels=("a", "b", "c"))
    assert check_bundle(DemoConfig(strategy="ce-lora", bundle=tri), tri, ["a", "b", "c"]) == tri
    with pytest.raises(ConfigError, match="--init frozen-seed"):
        check_bundle(DemoConfig(strategy="fleet-core", bundle=tri), tri, ["a", "b", "c"])
