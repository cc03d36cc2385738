"""CE-LoRA's data statistics travel once per agent and data, not every round, and in float16.

The agent side (data digest, the task's `stats_digest`, float16 on the wire) on its own, then real
`fedclip-agent start` processes and `fedclip-coord serve` over a real mosquitto: what each update
carried is read back from the agents' kept update blobs (the exact bytes they published).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import synthetic_images

from fedclip.coordinator.registry import Registry
from fedclip.coordinator.store import Store
from fedclip.device_agent.statistics import data_digest, wire_statistics
from fedclip.device_agent.task import parse_task
from fedclip.sdk.data import Dataset
from fedclip.sdk.errors import WireError
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.wire import (
    COMPRESSED_MAGIC,
    STAT_LABEL_HIST,
    STAT_MEAN,
    STAT_VAR,
    Envelope,
    MsgType,
    decode,
    encode,
)

FLEET = "so1"
LABELS = ("a", "b", "c")


# ---- agent side, no broker ------------------------------------------------------------------------
def test_task_stats_digest_is_parsed_and_bounded(tiny_bundle):
    manifest = Manifest.load(tiny_bundle)

    def task(**body):
        env = Envelope(MsgType.TASK, FLEET, "cam1", round=3, base_version="g-r2", body=body)
        return decode(encode(env), fleet=FLEET)

    base = {"bundle_id": manifest.bundle_id, "stats": ["histogram", "gaussian"]}
    assert parse_task(task(**base), manifest, "cam1", "task").stats_digest == ""
    ok = parse_task(task(**base, stats_digest="ab" * 32), manifest, "cam1", "task")
    assert ok.stats_digest == "ab" * 32 and ok.stats == ("histogram", "gaussian")
    for bad in ("x" * 129, 7, None, ["ab"]):
        with pytest.raises(WireError) as e:
            parse_task(task(**base, stats_digest=bad), manifest, "cam1", "task")
        assert "'stats_digest' must be a string of at most 128 chars" in str(e.value)
        assert "\n" not in str(e.value)


def test_data_digest_names_the_files_labels_kinds_and_noise(tmp_path):
    root = synthetic_images(tmp_path / "d", LABELS, {"a": 3, "b": 2}, seed=0)

    def digest(kinds=("histogram", "gaussian"), noise=0.0, skipped=()):
        ds = Dataset.open(root, labels=LABELS)
        ds.skipped.update(skipped)
        return data_digest(ds, kinds, noise)

    first = digest()
    assert len(first) == 64 and digest() == first  # stable: no image is decoded, nothing random
    assert digest(("gaussian", "histogram")) == first  # the kinds as a set
    assert digest(("histogram",)) != first and digest(noise=0.1) != first
    assert digest(skipped={"a/0.png"}) != first  # only readable samples count
    (root / "b" / "9.png").write_bytes((root / "a" / "0.png").read_bytes())  # a new file
    second = digest()
    assert second != first
    (root / "b" / "9.png").rename(root / "c" / "9.png")  # same bytes, another label
    third = digest()
    assert third not in (first, second)
    with open(root / "c" / "9.png", "ab") as f:  # same name, other size
        f.write(b"\0")
    assert digest() not in (first, second, third)


def test_wire_statistics_are_float16_where_they_fit():
    rng = np.random.default_rng(0)
    stats = {
        STAT_LABEL_HIST: np.array([3000.0, 1.0, 0.0], np.float32),
        STAT_MEAN: rng.normal(0, 0.2, (3, 16)).astype(np.float32),
        STAT_VAR: rng.uniform(1e-4, 0.05, (3, 16)).astype(np.float32),
    }
    out = wire_statistics(stats)
    assert out[STAT_LABEL_HIST].dtype == np.float32  # counts above 2048 would not be exact
    assert out[STAT_MEAN].dtype == out[STAT_VAR].dtype == np.float16
    np.testing.assert_allclose(out[STAT_MEAN], stats[STAT_MEAN], atol=2e-4)
    np.testing.assert_allclose(out[STAT_VAR], stats[STAT_VAR], rtol=1e-3)
    assert np.all(out[STAT_VAR] >= 0) and np.all(np.isfinite(out[STAT_VAR]))
    tiny = wire_statistics({STAT_VAR: np.full((1, 4), 1e-9, np.float32)})[STAT_VAR]
    assert np.all(tiny == 0)  # underflows to "no spread", never negative
    huge = {STAT_MEAN: np.full((1, 4), 1e5, np.float32)}
    assert wire_statistics(huge)[STAT_MEAN].dtype == np.float32  # would overflow to inf: kept


# ---- real agents and coordinator ------------------------------------------------------------------
class Fleet:
    """`fedclip-agent start` processes of one fleet, and `fedclip-coord serve` runs over one state."""

    def __init__(self, url: str, bundle: Path, tmp: Path, fleet: str):
        self.url, self.bundle, self.tmp, self.fleet = url, bundle, tmp, fleet
        self.state = tmp / "coord"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: list = []

    def data(self, aid: str) -> Path:
        return self.tmp / "data" / aid

    def start(self, aid: str) -> None:
        log = open(self.tmp / f"{aid}.log", "ab")
        self.logs.append(log)
        self.procs[aid] = subprocess.Popen(
            [sys.executable, "-m", "fedclip.device_agent.cli", "start", "--broker", self.url,
             "--fleet", self.fleet, "--id", aid, "--bundle", str(self.bundle), "--data",
             str(self.data(aid)), "--state", str(self.tmp / "agents" / aid), "--threads", "1"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def stop(self, aid: str) -> None:
        p = self.procs.pop(aid)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()

    def serve(self, rounds: int, *extra: str) -> None:
        coord = subprocess.run(
            [sys.executable, "-m", "fedclip.coordinator.cli", "serve", "--broker", self.url,
             "--fleet", self.fleet, "--bundle", str(self.bundle), "--state", str(self.state),
             "--strategy", "ce-lora", "--rounds", str(rounds), "--min-updates", "2",
             "--round-timeout", "240", "--local-epochs", "1", "--lr", "0.01", *extra],
            capture_output=True, text=True, timeout=360,
        )  # fmt: skip
        logs = "\n".join(p.read_text()[-1500:] for p in sorted(self.tmp.glob("*.log")))
        assert coord.returncode == 0, coord.stderr[-3000:] + logs

    def sent(self, aid: str, rnd: int) -> tuple[bytes, dict]:
        """The update `aid` published for round `rnd` (kept byte for byte in its state dir)."""
        blob = (self.tmp / "agents" / aid / "rounds" / str(rnd) / "update.bin").read_bytes()
        return blob, decode(blob, fleet=self.fleet).envelope.body

    def stats_sent(self, aid: str, rnd: int) -> dict[str, np.ndarray]:
        blob, _ = self.sent(aid, rnd)
        return decode(blob, fleet=self.fleet).stats

    def close(self) -> None:
        for aid in list(self.procs):
            self.stop(aid)
        for log in self.logs:
            log.close()


def _raw_len(payload: bytes) -> int:
    """A payload's size before the wire's zlib compression."""
    if payload[: len(COMPRESSED_MAGIC)] == COMPRESSED_MAGIC:
        return len(zlib.decompress(payload[len(COMPRESSED_MAGIC) :]))
    return len(payload)


def _gaussian_bytes(manifest: Manifest) -> int:
    """What float16 means and variances of every label take on the wire."""
    return 2 * len(manifest.task.labels) * manifest.base_model.embed_dim * 2


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stats_travel_once_and_again_when_the_data_changes(mosquitto, bundle_factory, tmp_path):
    bundle = bundle_factory(adapter="tri-lora", labels=LABELS)
    manifest = Manifest.load(bundle)
    fleet = Fleet(mosquitto.url, bundle, tmp_path, FLEET)
    mixes = {"cam1": {"a": 8, "b": 4}, "cam2": {"b": 4, "c": 8}}
    try:
        for n, (aid, mix) in enumerate(mixes.items()):
            synthetic_images(fleet.data(aid), LABELS, mix, seed=n)
            fleet.start(aid)
        fleet.serve(3)
        with Store(fleet.state, readonly=True) as s:
            assert [r.state for r in s.rounds()] == ["aggregated"] * 3, s.rejections()
            assert s.rejections() == []
            wire = {r: {u.agent: u.wire_bytes for u in s.updates(r)} for r in (1, 2, 3)}
            held = {aid: s.agent_stats(aid) for aid in mixes}
            tasks = {r: {a: s.blobs.get(b) for a, (_, b) in s.selections(r).items()} for r in (1, 2, 3)}
            reg = Registry(s, "")
            personal = {aid: reg.load(f"a-{aid}-r3")[0] for aid in mixes}
        for aid in mixes:
            first = fleet.stats_sent(aid, 1)
            assert first[STAT_MEAN].dtype == first[STAT_VAR].dtype == np.float16
            assert first[STAT_LABEL_HIST].dtype == np.float32
            digest = fleet.sent(aid, 1)[1]["data_digest"]
            assert held[aid].round == 1 and held[aid].data_digest == digest
            assert "stats_digest" not in decode(tasks[1][aid], fleet=FLEET).envelope.body
            for rnd in (2, 3):
                assert decode(tasks[rnd][aid], fleet=FLEET).envelope.body["stats_digest"] == digest
                blob, body = fleet.sent(aid, rnd)
                assert set(fleet.stats_sent(aid, rnd)) == {STAT_LABEL_HIST}  # the histogram only
                assert body["data_digest"] == digest
                assert wire[rnd][aid] == len(blob)  # what travelled, as the coordinator counted it
                # Payloads travel zlib-compressed and absent labels' rows are zeros, so the statistics
                # cost less than their raw size; their presence is checked on the decoded tensors.
                assert wire[1][aid] > wire[rnd][aid]
                assert _raw_len(fleet.sent(aid, 1)[0]) - _raw_len(blob) >= _gaussian_bytes(manifest)
            assert wire[1][aid] == len(fleet.sent(aid, 1)[0])
        # the held statistics still personalize: different data, different adapters
        k = sorted(personal["cam1"])[0]
        assert not np.allclose(personal["cam1"][k], personal["cam2"][k])

        # cam1 gets new images (seen when it restarts): its next update carries statistics again
        fleet.stop("cam1")
        synthetic_images(tmp_path / "more", LABELS, {"c": 5}, seed=7)
        for src in sorted((tmp_path / "more" / "c").iterdir()):
            src.rename(fleet.data("cam1") / "c" / f"new-{src.name}")
        fleet.start("cam1")
        fleet.serve(4)
        with Store(fleet.state, readonly=True) as s:
            assert s.get_round(4).state == "aggregated" and s.rejections() == []
            held4 = {aid: s.agent_stats(aid) for aid in mixes}
            wire4 = {u.agent: u.wire_bytes for u in s.updates(4)}
        new = fleet.stats_sent("cam1", 4)
        assert set(new) == {STAT_LABEL_HIST, STAT_MEAN, STAT_VAR}
        assert new[STAT_LABEL_HIST][2] > 0  # the new label is in the resent statistics
        assert held4["cam1"].round == 4 and held4["cam1"].data_digest != held["cam1"].data_digest
        assert set(fleet.stats_sent("cam2", 4)) == {STAT_LABEL_HIST}
        assert held4["cam2"] == held["cam2"]
        assert wire4["cam1"] > wire4["cam2"]
    finally:
        fleet.close()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_stats_refresh_rounds_asks_again_every_n_rounds(mosquitto, bundle_factory, tmp_path):
    bundle = bundle_factory(adapter="tri-lora", labels=LABELS)
    fleet = Fleet(mosquitto.url, bundle, tmp_path, "so2")
    try:
        for n, (aid, mix) in enumerate((("cam1", {"a": 6, "b": 3}), ("cam2", {"c": 6, "b": 3}))):
            synthetic_images(fleet.data(aid), LABELS, mix, seed=n)
            fleet.start(aid)
        fleet.serve(4, "--stats-refresh-rounds", "2")
        with Store(fleet.state, readonly=True) as s:
            assert [r.state for r in s.rounds()] == ["aggregated"] * 4 and s.rejections() == []
            held = {aid: s.agent_stats(aid) for aid in ("cam1", "cam2")}
        for aid in ("cam1", "cam2"):
            carried = [STAT_MEAN in fleet.stats_sent(aid, rnd) for rnd in (1, 2, 3, 4)]
            assert carried == [True, False, True, False]
            assert held[aid].round == 3
    finally:
        fleet.close()
