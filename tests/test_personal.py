"""Personal tuning (`device_agent.personal`): an agent with `personal.mu > 0` tunes each adapter a signed
rollout installs on its own images, held near it, and its inference serves that copy; rollbacks go
back to the previous adapter's copy; rounds and the trainer are untouched. In process over the
memory transport with a real bundle, real ONNX Runtime and a real state dir; test_personal_fleet.py
runs it through mosquitto and an agent process."""

from __future__ import annotations

import json
import logging
import time

import numpy as np
import pytest
from test_agent_unit import AGENT, FLEET, LABELS, TOPICS, Harness  # noqa: F401  (the module's fixtures)
from typer.testing import CliRunner

from fedclip.device_agent.classifier import installed_adapter
from fedclip.device_agent.cli import app
from fedclip.device_agent.config import AgentConfig
from fedclip.device_agent.personal import WORK_CKPT, WORK_INFO, PersonalTuning
from fedclip.device_agent.personalize import personalize
from fedclip.device_agent.state_summary import summarize
from fedclip.sdk import messages
from fedclip.sdk.adapters import load_adapter
from fedclip.sdk.errors import ConfigError
from fedclip.sdk.ledger import Ledger
from fedclip.sdk.signing import ensure_keypair, sign_envelope
from fedclip.sdk.wire import Envelope, MsgType, encode


@pytest.fixture(scope="module")
def step_bundle(bundle_factory):
    return bundle_factory(labels=LABELS, formats=("step",))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    from fixtures_data import synthetic_images

    return synthetic_images(tmp_path_factory.mktemp("images"), LABELS, dict.fromkeys(LABELS, 8), seed=1)


def _distance(a: dict, b: dict) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]) ** 2) for k in a)))


def _rollout(h: Harness, key, rid: int, version: str, seed: int) -> tuple[bytes, dict]:
    """(the signed rollout of `version` with the harness's adapter for `seed`, its tensors)."""
    tensors = h.adapter(seed)
    body = {"rollout": rid, "stage": "rest", "version": version, "bundle_id": h.manifest.bundle_id}
    env = Envelope(MsgType.ADAPTER, FLEET, AGENT, base_version=version, body=body)
    return encode(sign_envelope(key, env, tensors), tensors), tensors


def test_the_settings_are_checked_and_read_from_agent_yaml(tmp_path, step_bundle):
    for bad in (
        {"mu": -1.0},
        {"mu": float("nan")},
        {"mu": 1e9},
        {"epochs": 0},
        {"lr": 0.0},
        {"batch_size": 0},
        {"report_every": -1.0},
        {"report_every": float("nan")},
        {"report_every": float("inf")},
    ):
        with pytest.raises(ConfigError, match="personal"):
            PersonalTuning(**bad)
    where = {"broker": "mqtt://127.0.0.1:1", "fleet": FLEET, "id": AGENT, "bundle": step_bundle,
             "data": tmp_path, "state": tmp_path / "s"}  # fmt: skip
    with pytest.raises(ConfigError, match="step backend"):
        AgentConfig(**where, backend="ort-training", personal=PersonalTuning(mu=1.0))
    assert AgentConfig(**where, personal=PersonalTuning(mu=1.0)).training_backend == "step"
    assert AgentConfig(**where).training_backend == "auto"  # off: the backend as configured
    yaml_file = tmp_path / "agent.yaml"
    yaml_file.write_text("personal:\n  mu: 1.5\n  epochs: 4\n  report_every: 5\n")
    cfg = AgentConfig.load(yaml_file, {k: v for k, v in where.items()})
    assert cfg.personal == PersonalTuning(mu=1.5, epochs=4, report_every=5.0)
    # how often it reports is not what the copy depends on: a paused tuning resumes across it
    assert cfg.personal.training() == PersonalTuning(mu=1.5, epochs=4).training()
    yaml_file.write_text("personal:\n  mu: -2\n")
    with pytest.raises(ConfigError, match="personal.mu"):
        AgentConfig.load(yaml_file, where)


@pytest.mark.slow
def test_a_rollout_is_tuned_on_the_device_and_served_as_its_personal_copy(step_bundle, image_dir, tmp_path):
    key, pub = ensure_keypair(tmp_path / "keys")
    tuning = PersonalTuning(mu=1.0, epochs=4, lr=5e-2, batch_size=4)
    h = Harness(step_bundle, image_dir, tmp_path / "state", coordinator_key=pub, personal=tuning)
    state, trainer = h.agent.runner.state, h.agent.runner.trainer

    def push(rid: int, version: str, seed: int) -> dict:
        blob, tensors = _rollout(h, key, rid, version, seed)
        h.send(blob, topic=TOPICS.adapter(AGENT))
        return tensors

    def rollback(rid: int, version: str) -> None:
        body = {"command": "rollback", "rollout": rid, "version": version, "reason": "test"}
        env = sign_envelope(key, Envelope(MsgType.COMMAND, FLEET, AGENT, body=body))
        h.send(encode(env), topic=TOPICS.agent(AGENT, "command"))

    try:
        before = trainer.get_tensors()
        fleet = push(1, "r1", 11)
        entry = Ledger.read(state.root).entry("r1")
        assert entry is not None and entry.personal is not None and entry.personal.is_file()
        assert installed_adapter(state.root)[1:] == ("r1+personal", entry.personal)
        mine, meta = load_adapter(entry.personal)
        assert (meta.parent_version, meta.strategy, meta.label_prior) == ("r1", "personal", ())
        moved = _distance({k: mine[k] for k in fleet}, fleet)
        assert moved > 0, "the copy is the fleet's adapter: nothing was tuned"
        record = state.record["adapters"]["r1"]["personal"]
        assert record["mu"] == 1.0 and 0 <= record["accuracy"] <= 1 and 0 <= record["accuracy_fleet"] <= 1
        for k, v in before.items():  # the trainer (a round's state) is as it was
            np.testing.assert_array_equal(trainer.get_tensors()[k], v, err_msg=k)
        assert state.current_adapter == "r1"  # the ledger, the status and the acks name the fleet's adapter
        assert h.status()["adapter_version"] == "r1"
        info = summarize(state.root)  # `fedclip-agent status`: both
        assert (info["adapter_version"], info["serving"]) == ("r1", "r1+personal")
        # the retained status tells the coordinator, republished once the copy is kept
        assert h.status()["personal"] == {k: v for k, v in record.items() if k != "file"}

        # each rollout gets its copy; a rollback serves the previous adapter's copy, not tuned again
        stamp = entry.personal.stat().st_mtime_ns
        push(2, "r2", 22)
        push(3, "r3", 33)
        assert Ledger.read(state.root).entry("r3").personal.is_file()
        rollback(3, "r3")
        assert installed_adapter(state.root)[1] == "r2+personal"
        rollback(2, "r2")
        assert installed_adapter(state.root)[1] == "r1+personal"
        assert Ledger.read(state.root).entry("r1").personal.stat().st_mtime_ns == stamp  # not tuned again

        # a round trains from its task's adapter, publishes its update and leaves the copy alone
        task = messages.Task(
            1, h.manifest.bundle_id, time.time() + 3600, messages.Hyperparameters(1, 1e-3, 4),
            base_version="start-1", adapter=h.adapter(1),
        )  # fmt: skip
        h.send(messages.encode(task, FLEET, AGENT, key=key))
        (update,) = h.updates()
        assert update.envelope.round == 1
        assert installed_adapter(state.root)[1] == "r1+personal"
        assert Ledger.read(state.root).entry("r1").personal.stat().st_mtime_ns == stamp
    finally:
        h.close()


@pytest.mark.slow
def test_the_pull_holds_the_copy_near_the_fleets_adapter(step_bundle, image_dir, tmp_path):
    """The same rollout tuned at mu 0.001 and at mu 1000: the strong pull ends much nearer."""
    key, pub = ensure_keypair(tmp_path / "keys")
    moved = {}
    for mu in (1e-3, 1e3):
        h = Harness(step_bundle, image_dir, tmp_path / f"state-{mu}", coordinator_key=pub,
                    personal=PersonalTuning(mu=mu, epochs=4, lr=5e-2, batch_size=4))  # fmt: skip
        try:
            blob, tensors = _rollout(h, key, 1, "r1", 5)
            h.send(blob, topic=TOPICS.adapter(AGENT))
            mine, _ = load_adapter(Ledger.read(h.agent.runner.state.root).entry("r1").personal)
            moved[mu] = _distance({k: mine[k] for k in tensors}, tensors)
        finally:
            h.close()
    assert 0 < moved[1e3] < 0.5 * moved[1e-3], moved


TUNING = PersonalTuning(mu=1.0, epochs=4, lr=5e-2, batch_size=4)  # 5 batches of 4 a epoch here


def _interrupt_at(h: Harness, step: int, act) -> None:
    """Call `act()` once, during the personal tuning's `step`-th training step (the trainer's
    AdamW step count: the tuning starts from a reset optimizer, a round's steps do not count)."""
    trainer = h.agent.runner.trainer
    real = trainer.train_step
    fired = []

    def train_step(inputs):
        loss = real(inputs)
        if not fired and trainer.prox_mu > 0 and trainer.step == step:
            fired.append(step)
            act()
        return loss

    trainer.train_step = train_step


def _copy(h: Harness, version: str) -> dict:
    entry = Ledger.read(h.agent.runner.state.root).entry(version)
    assert entry is not None and entry.personal is not None and entry.personal.is_file(), version
    return load_adapter(entry.personal)[0]


def _uninterrupted_copy(bundle, images, where, key, pub) -> dict:
    """r1's personal copy as an agent makes it with nothing arriving during the tuning."""
    h = Harness(bundle, images, where, coordinator_key=pub, personal=TUNING)
    try:
        h.send(_rollout(h, key, 1, "r1", 11)[0], topic=TOPICS.adapter(AGENT))
        return _copy(h, "r1")
    finally:
        h.close()


def _assert_same(got: dict, want: dict) -> None:
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)


def _task(h: Harness, key, rnd: int) -> bytes:
    task = messages.Task(
        rnd, h.manifest.bundle_id, time.time() + 3600, messages.Hyperparameters(1, 1e-3, 4),
        base_version=f"start-{rnd}", adapter=h.adapter(rnd),
    )  # fmt: skip
    return messages.encode(task, FLEET, AGENT, key=key)


@pytest.mark.slow
def test_the_fleet_sees_each_next_epoch_of_a_tuning_at_most_every_report_every_seconds(
    step_bundle, image_dir, tmp_path
):
    """The retained status carries the epoch a tuning is in: announced at its start, each next epoch
    when no status went out for `report_every` seconds (0 here: every epoch), gone once the copy is
    kept. At the default 60 s a tuning of seconds shows only its start (the next test's statuses)."""
    key, pub = ensure_keypair(tmp_path / "keys")
    tuning = PersonalTuning(mu=TUNING.mu, epochs=TUNING.epochs, lr=TUNING.lr,
                            batch_size=TUNING.batch_size, report_every=0.0)  # fmt: skip
    h = Harness(step_bundle, image_dir, tmp_path / "state", coordinator_key=pub, personal=tuning)
    try:
        h.send(_rollout(h, key, 1, "r1", 11)[0], topic=TOPICS.adapter(AGENT))
        assert installed_adapter(h.agent.runner.state.root)[1] == "r1+personal"
        said = [m.envelope.body for m in h.sent(TOPICS.status(AGENT))]
        tunings = [tuple(b["tuning"].values()) for b in said if "tuning" in b]
        assert tunings == [("r1", e, 4) for e in (1, 2, 3, 4)], tunings
        assert "tuning" not in said[-1] and said[-1]["personal"]["mu"] == 1.0, said[-1]
    finally:
        h.close()


@pytest.mark.slow
def test_a_message_pauses_the_tuning_and_it_resumes_to_the_same_copy(step_bundle, image_dir, tmp_path):
    """A round's task arriving mid-tuning is answered before the tuning goes on; the copy is bit for
    bit the one an uninterrupted tuning makes, and the round's update the one an agent without
    personal tuning sends for the same task."""
    key, pub = ensure_keypair(tmp_path / "keys")
    want = _uninterrupted_copy(step_bundle, image_dir, tmp_path / "plain", key, pub)
    alone = Harness(step_bundle, image_dir, tmp_path / "alone", coordinator_key=pub)
    try:
        alone.send(_task(alone, key, 1))
        (want_update,) = alone.updates()
    finally:
        alone.close()

    h = Harness(step_bundle, image_dir, tmp_path / "state", coordinator_key=pub, personal=TUNING)
    state = h.agent.runner.state
    try:
        _interrupt_at(h, 7, lambda: h.coordinator.publish(TOPICS.task(AGENT), _task(h, key, 1), qos=1))
        h.send(_rollout(h, key, 1, "r1", 11)[0], topic=TOPICS.adapter(AGENT))
        # paused in its second epoch, where it stood, the fleet's adapter still serving
        assert installed_adapter(state.root)[1] == "r1"
        work = json.loads(state.scratch_path(WORK_INFO).read_text())
        assert (work["version"], work["epoch"], work["batch"], work["steps"]) == ("r1", 1, 2, 7), work
        assert h.updates() == []
        assert h.agent.poll(timeout=5), "the task waited for the tuning"
        (update,) = h.updates()  # answered, and then the tuning finished
        assert installed_adapter(state.root)[1] == "r1+personal"
        assert not state.scratch_path(WORK_INFO).exists() and not state.scratch_path(WORK_CKPT).exists()
        _assert_same(_copy(h, "r1"), want)
        assert update.envelope.round == 1
        _assert_same(update.tensors, want_update.tensors)
        # the fleet saw it: announced at the start, where it stood in the round's status, then the copy
        said = [m.envelope.body for m in h.sent(TOPICS.status(AGENT))]
        tunings = [tuple(b["tuning"].values()) for b in said if "tuning" in b]
        assert tunings == [("r1", 1, 4), ("r1", 2, 4)], tunings
        assert "tuning" not in said[-1] and said[-1]["personal"]["mu"] == 1.0, said[-1]
    finally:
        h.close()


@pytest.mark.slow
def test_a_stop_mid_tuning_resumes_at_the_next_start(step_bundle, image_dir, tmp_path, caplog):
    """Stopped in its third epoch, the tuning goes on at the next start and makes the same copy; a
    paused record that disagrees with its checkpoint (a crash between the two writes) starts over,
    to the same copy; an adapter whose tuning fails is not retried at every idle moment."""
    key, pub = ensure_keypair(tmp_path / "keys")
    want = _uninterrupted_copy(step_bundle, image_dir, tmp_path / "ref", key, pub)

    where = tmp_path / "state"
    h = Harness(step_bundle, image_dir, where, coordinator_key=pub, personal=TUNING)
    _interrupt_at(h, 12, h.agent.stop.set)
    h.send(_rollout(h, key, 1, "r1", 11)[0], topic=TOPICS.adapter(AGENT))
    state = h.agent.runner.state
    assert json.loads(state.scratch_path(WORK_INFO).read_text())["steps"] == 12
    h.close()
    # `fedclip-agent status` says so (12 steps of 5 a epoch: resumes in the third of 4)
    assert summarize(where)["personal_tuning"] == {"adapter": "r1", "epoch": 3, "epochs": 4}
    table = CliRunner().invoke(app, ["status", "--state", str(where)])
    assert table.exit_code == 0 and "r1: paused, resumes in epoch 3 of 4" in table.output, table.output
    with caplog.at_level(logging.INFO, logger="fedclip.agent"):
        h = Harness(step_bundle, image_dir, where, coordinator_key=pub, personal=TUNING)  # start resumes
        h.close()
    assert "personal tuning of r1: resumed in epoch 3" in caplog.text
    said = [m.envelope.body.get("tuning") for m in h.sent(TOPICS.status(AGENT))]
    assert {"adapter": "r1", "epoch": 3, "epochs": 4} in said and said[-1] is None  # announced, then done
    assert summarize(where)["personal_tuning"] is None
    _assert_same(_copy(h, "r1"), want)

    # a record ahead of its checkpoint: dropped, the tuning starts over, the copy is the same
    where = tmp_path / "crash"
    h = Harness(step_bundle, image_dir, where, coordinator_key=pub, personal=TUNING)
    _interrupt_at(h, 3, h.agent.stop.set)
    h.send(_rollout(h, key, 1, "r1", 11)[0], topic=TOPICS.adapter(AGENT))
    h.close()
    info = h.agent.runner.state.scratch_path(WORK_INFO)
    info.write_text(json.dumps({**json.loads(info.read_text()), "steps": 9, "batch": 4}))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedclip.agent"):
        h = Harness(step_bundle, image_dir, where, coordinator_key=pub, personal=TUNING)
    try:
        assert "starts over" in caplog.text and "checkpoint is at step 3, its record at 9" in caplog.text
        _assert_same(_copy(h, "r1"), want)

        # r2's file unreadable when its paused tuning resumes: one warning, not one per idle poll
        def corrupt() -> None:
            entry = Ledger.read(h.agent.runner.state.root).entry("r2")
            entry.file.write_bytes(b"not an adapter")

        _interrupt_at(h, 2, lambda: (corrupt(), h.coordinator.publish(TOPICS.task(AGENT), _task(h, key, 1))))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="fedclip.agent"):
            h.send(_rollout(h, key, 2, "r2", 22)[0], topic=TOPICS.adapter(AGENT))
            assert h.agent.poll(timeout=5)  # the task; then the resume fails
            for _ in range(3):
                assert not h.agent.poll(timeout=0.01)
        assert caplog.text.count("personal tuning failed") == 1, caplog.text
        assert installed_adapter(h.agent.runner.state.root)[1] == "r2"  # the fleet's adapter serves
        said = h.status()  # the fleet no longer sees it tuning, and learns why
        assert "tuning" not in said and said["notice"].startswith("personal tuning of r2 failed"), said
    finally:
        h.close()


@pytest.mark.slow
def test_a_tuning_advances_a_step_each_time_however_busy_the_agent_is(step_bundle, image_dir, tmp_path):
    """A message always waiting: every call trains one step, pauses and checkpoints; the 20th
    finishes (4 epochs of 5 batches) with the copy an uninterrupted tuning makes."""
    key, pub = ensure_keypair(tmp_path / "keys")
    want = _uninterrupted_copy(step_bundle, image_dir, tmp_path / "ref", key, pub)
    h = Harness(step_bundle, image_dir, tmp_path / "state", coordinator_key=pub)  # tuning off
    try:
        h.send(_rollout(h, key, 1, "r1", 11)[0], topic=TOPICS.adapter(AGENT))
        runner, calls, metrics = h.agent.runner, 0, None
        while metrics is None and calls < 50:
            metrics = personalize(runner, TUNING, yield_to=lambda: True)
            calls += 1
            if metrics is None:  # paused after one step more
                assert json.loads(runner.state.scratch_path(WORK_INFO).read_text())["steps"] == calls
        assert calls == 20 and metrics is not None and metrics["mu"] == TUNING.mu
        _assert_same(_copy(h, "r1"), want)
    finally:
        h.close()


@pytest.mark.slow
def test_a_hostile_or_corrupt_paused_record_is_dropped_and_the_tuning_starts_over(
    step_bundle, image_dir, tmp_path, caplog
):
    """A paused tuning's record that is not JSON, not an object, incomplete, of another adapter or
    settings, or stands where this tuning cannot (huge, negative, fractional, infinite positions):
    one log line, the files dropped, the tuning starts over from the fleet's adapter; `fedclip-agent
    status` never fails on it."""
    key, pub = ensure_keypair(tmp_path / "keys")
    h = Harness(step_bundle, image_dir, tmp_path / "state", coordinator_key=pub)  # tuning off
    try:
        h.send(_rollout(h, key, 1, "r1", 11)[0], topic=TOPICS.adapter(AGENT))
        runner = h.agent.runner
        info = runner.state.scratch_path(WORK_INFO)
        assert personalize(runner, TUNING, yield_to=lambda: True) is None  # paused after one step
        good = json.loads(info.read_text())
        assert (good["epoch"], good["batch"], good["steps"]) == (0, 1, 1)
        bad: list[bytes] = [b"not json \xff", b"[1, 2]", b'{"version": "r1"}']
        for field, value in (("epoch", 10**30), ("batch", 10**9), ("epoch", -1), ("batch", 1.5),
                             ("epoch", "1"), ("version", "r9"), ("settings", {**good["settings"], "mu": 9.0}),
                             ("settings", None)):  # fmt: skip
            bad.append(json.dumps({**good, field: value}).encode())
        bad.append(json.dumps(good).replace('"epoch": 0', '"epoch": Infinity').encode())
        for blob in bad:
            info.write_bytes(blob)
            shown = summarize(runner.state.root)["personal_tuning"]  # never raises
            assert shown is None or shown["adapter"] in ("r1", "r9"), shown
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="fedclip.agent"):
                assert personalize(runner, TUNING, yield_to=lambda: True) is None
            assert "starts over" in caplog.text, (blob, caplog.text)
            again = json.loads(info.read_text())  # started over: one step from the fleet's adapter
            assert (again["version"], again["epoch"], again["batch"], again["steps"]) == ("r1", 0, 1, 1), blob
    finally:
        h.close()
