"""fleet-lora through the real path: `fedclip-coord serve` and three `fedclip-agent start` processes
over a real mosquitto, on a plain LoRA bundle, with balanced-softmax training (`--loss`).

Two agents hold the same label mix (the same "camera group"), the third other labels. After the
round, the coordinator's stored personalized adapters must be exactly what `FleetLora.aggregate`
gives on the stored updates and statistics, and each agent of the pair must have been pulled toward
the other and not toward the third. Each agent trained without its own label mix, recorded the
mix in its state dir, and every adapter it kept carries it for inference (balanced softmax).
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from fixtures_data import synthetic_images
from fixtures_fleet import AgentProc

from fedclip.coordinator.store import Store
from fedclip.coordinator.strategies import StrategyOptions, Update
from fedclip.coordinator.strategies.fleet_lora import FleetLora
from fedclip.device_agent.config import AgentConfig
from fedclip.sdk import messages
from fedclip.sdk.adapters import adapter_from_bytes, load_adapter
from fedclip.sdk.data import Dataset
from fedclip.sdk.ledger import Ledger, read_record
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import KNOWN_STATS, Task

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

MIXES = {"cam1": {"a": 10, "b": 6}, "cam2": {"a": 10, "b": 6}, "cam3": {"c": 24}}  # each holds one out
TAU = 0.1


def _flat(tensors, names):
    return np.concatenate([np.ravel(np.asarray(tensors[k], np.float64)) for k in names])


def _start_agent(tmp_path, broker: str, bundle, labels, aid: str, mix: dict, seed: int) -> AgentProc:
    data = synthetic_images(tmp_path / "data" / aid, labels, mix, seed=seed)
    return AgentProc(tmp_path / "logs", [
        "--broker", broker, "--fleet", "e2e", "--id", aid, "--bundle", str(bundle),
        "--data", str(data), "--state", str(tmp_path / "agents" / aid), "--threads", "1",
    ], aid, tmp_path / "agents" / aid)  # fmt: skip


def _serve(broker: str, bundle, state, rounds: int, min_updates: int, agents: list[AgentProc]) -> str:
    """`fedclip-coord serve` until `rounds` rounds are aggregated in `state`; its log."""
    coord = subprocess.run(
        [sys.executable, "-m", "fedclip.coordinator.cli", "serve", "--broker", broker,
         "--fleet", "e2e", "--bundle", str(bundle), "--state", str(state), "--strategy", "fleet-lora",
         "--lam", "1", "--tau", str(TAU), "--rounds", str(rounds), "--min-updates", str(min_updates),
         "--round-timeout", "300", "--local-epochs", "2", "--lr", "0.02",
         "--loss", "balanced-softmax"],
        capture_output=True, text=True, timeout=360,
    )  # fmt: skip
    assert coord.returncode == 0, coord.stderr[-3000:] + "\n".join(a.tail(10) for a in agents)
    return coord.stderr


def test_fleet_lora_round_with_real_agents(mosquitto, bundle_factory, tmp_path):
    bundle = bundle_factory(adapter="lora", labels=("a", "b", "c"))
    manifest = Manifest.load(bundle)
    names = tuple(sorted(t.name for t in manifest.exchanged))
    state = tmp_path / "coord"
    agents = []
    try:
        for n, (aid, mix) in enumerate(MIXES.items()):
            agents.append(_start_agent(tmp_path, mosquitto.url, bundle, manifest.task.labels, aid, mix, n))
        _serve(mosquitto.url, bundle, state, 1, 3, agents)
    finally:
        for agent in agents:
            agent.kill()

    # Balanced softmax on the device: the histogram of each agent's training split (its held-out part
    # left out, as the agent splits it) is in its state dir, and on the adapter the task started it from.
    for aid in MIXES:
        data = Dataset.open(tmp_path / "data" / aid, labels=manifest.task.labels, kind="classify")
        train, _ = data.split(AgentConfig.holdout)
        counts = train.label_counts().tolist()
        assert counts == read_record(tmp_path / "agents" / aid)["label_prior"], aid
        ledger = Ledger.read(tmp_path / "agents" / aid)
        assert [e.version for e in ledger.entries] == ["g-r0"]
        assert load_adapter(ledger.entries[0].file)[1].label_prior == tuple(counts)

    with Store(state, readonly=True) as s:
        assert [r.state for r in s.rounds()] == ["aggregated"], s.rejections()
        assert s.rejections() == []
        rows = s.updates(1)
        assert [r.agent for r in rows] == list(MIXES)

        def adapter(version: str) -> dict[str, np.ndarray]:
            row = s.version(version)
            assert row is not None, version
            return adapter_from_bytes(s.blobs.get(row.blob), version)[0]

        start = adapter("g-r0")
        updates = [
            Update(
                r.agent, r.num_samples, s.blobs.read_tensors(r.blob, names), start,
                s.blobs.read_tensors(r.blob, KNOWN_STATS),
            )
            for r in rows
        ]  # fmt: skip
        stored = {a: adapter(f"a-{a}-r1") for a in MIXES}
        stored_global = adapter("g-r1")
    assert all(set(u.stats) >= {"stats/label_hist", "stats/mean", "stats/var"} for u in updates), [
        sorted(u.stats) for u in updates
    ]
    expect = FleetLora(StrategyOptions(lam=1.0, tau=TAU)).aggregate(1, updates)
    for a in MIXES:
        np.testing.assert_allclose(_flat(stored[a], names), _flat(expect.per_agent[a], names), atol=1e-6)
    np.testing.assert_allclose(_flat(stored_global, names), _flat(expect.global_tensors, names), atol=1e-6)

    # The pair pooled: each one's personalized adapter lies nearer its mate's update than the third's,
    # and the third, alone with its labels, kept (nearly) its own update.
    x = {u.agent: _flat(u.tensors, names) for u in updates}
    p = {a: _flat(stored[a], names) for a in MIXES}
    for a, mate in (("cam1", "cam2"), ("cam2", "cam1")):
        assert np.linalg.norm(p[a] - x[mate]) < np.linalg.norm(p[a] - x["cam3"])
        assert np.linalg.norm(p[a] - x[mate]) < np.linalg.norm(x[a] - x[mate])
    assert np.linalg.norm(p["cam3"] - x["cam3"]) < 0.1 * np.linalg.norm(x["cam3"] - x["cam1"])


def test_a_newcomer_joins_with_the_adapters_of_the_agents_like_it(mosquitto, bundle_factory, tmp_path):
    """After a round of three agents a fourth joins with cam1's label mix. Its first task is statistics
    only (epochs 0): it sends its start back unchanged with its statistics, and the round gives it
    the members' new adapters weighted by how like theirs its data is (`FleetLora.aggregate`, on the
    stored updates), nearer the pair with its labels than the third; the next round it trains from
    that adapter."""
    bundle = bundle_factory(adapter="lora", labels=("a", "b", "c"))
    manifest = Manifest.load(bundle)
    names = tuple(sorted(t.name for t in manifest.exchanged))
    labels, state = manifest.task.labels, tmp_path / "coord"
    agents = []
    try:
        for n, (aid, mix) in enumerate(MIXES.items()):
            agents.append(_start_agent(tmp_path, mosquitto.url, bundle, labels, aid, mix, n))
        _serve(mosquitto.url, bundle, state, 1, 3, agents)
        agents.append(_start_agent(tmp_path, mosquitto.url, bundle, labels, "new", MIXES["cam1"], 9))
        log = _serve(mosquitto.url, bundle, state, 3, 4, agents)  # rounds 2 and 3, with the newcomer
    finally:
        for agent in agents:
            agent.kill()
    assert "1 newcomer(s) asked for statistics only" in log
    assert "statistics only" in agents[-1].text()

    with Store(state, readonly=True) as s:
        assert [r.state for r in s.rounds()] == ["aggregated"] * 3 and s.rejections() == []

        def adapter(version: str) -> dict[str, np.ndarray]:
            row = s.version(version)
            assert row is not None, version
            return adapter_from_bytes(s.blobs.get(row.blob), version)[0]

        def task(rnd: int, agent: str) -> Task:
            blob = s.selections(rnd)[agent][1]
            return messages.decode(Task, s.blobs.get(blob), fleet="e2e", max_bytes=10_000_000)

        sel2 = {a: v for a, (v, _) in s.selections(2).items()}
        assert sel2 == {"cam1": "a-cam1-r1", "cam2": "a-cam2-r1", "cam3": "a-cam3-r1", "new": "g-r1"}
        assert task(2, "new").hyperparameters.epochs == 0
        assert {task(2, a).hyperparameters.epochs for a in MIXES} == {2}
        updates = [
            Update(
                r.agent, r.num_samples, s.blobs.read_tensors(r.blob, names), adapter(sel2[r.agent]),
                s.blobs.read_tensors(r.blob, KNOWN_STATS),
            )
            for r in s.updates(2)
        ]  # fmt: skip
        stored = {a: adapter(f"a-{a}-r2") for a in [*MIXES, "new"]}
        stored_global = adapter("g-r2")
        # The next round the newcomer trains, from the adapter it was given.
        assert s.selections(3)["new"][0] == "a-new-r2" and task(3, "new").hyperparameters.epochs == 2
        r3 = {r.agent: r for r in s.updates(3)}
        trained = s.blobs.read_tensors(r3["new"].blob, names)
        assert any(not np.array_equal(trained[k], stored["new"][k]) for k in names)

    new = next(u for u in updates if u.agent == "new")
    assert all(np.array_equal(new.tensors[k], new.base[k]) for k in names)  # sent back unchanged
    expect = FleetLora(StrategyOptions(lam=1.0, tau=TAU)).aggregate(2, updates)
    assert expect.metrics["newcomers"] == 1.0
    for a in [*MIXES, "new"]:
        np.testing.assert_allclose(_flat(stored[a], names), _flat(expect.per_agent[a], names), atol=1e-6)
    np.testing.assert_allclose(_flat(stored_global, names), _flat(expect.global_tensors, names), atol=1e-6)
    p = {a: _flat(stored[a], names) for a in stored}
    assert np.linalg.norm(p["new"] - p["cam1"]) < np.linalg.norm(p["new"] - p["cam3"])
    assert np.linalg.norm(p["new"] - p["cam2"]) < np.linalg.norm(p["new"] - p["cam3"])
