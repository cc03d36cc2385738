"""Rollouts end to end: a real mosquitto, the coordinator's RolloutManager, and small real agents
(a real MqttSession + RolloutClient + ONNX Runtime evaluation of the tiny bundle on Fashion-MNIST).

The agents' "current" adapter is trained here for a few epochs on their held-out images so it is
well above chance; the deliberately bad adapter keeps its A and replaces B with large random values.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclip.coordinator.rollout import (
    COMPLETE,
    ROLLED_BACK,
    DictSource,
    RolloutManager,
    RolloutParams,
    RolloutStore,
    Target,
    read_fleet,
)
from fedclip.device_agent.rollout_client import RolloutClient
from fedclip.sdk.adapters import AdapterMeta, save_adapter
from fedclip.sdk.data import Dataset, label_folder_name
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import MqttSession, Will
from fedclip.sdk.signing import ensure_keypair, generate_key, sign_envelope
from fedclip.sdk.wire import Envelope, MsgType, Topics, decode, encode

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]

FLEET = "fleet1"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
WAIT_S = 120  # generous: the suite shares 2 cores


# ---- data, adapters, evaluation (real ORT) -------------------------------------------------------
def _idx(path: Path) -> np.ndarray:
    raw = gzip.decompress(path.read_bytes())
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class Evaluator:
    """One ORT trainer shared by the harness agents (a lock keeps evaluations apart)."""

    def __init__(self, bundle: Path, data: Path):
        from fedclip.device_agent.trainer import OrtTrainer

        self.trainer = OrtTrainer(bundle)
        self.manifest: Manifest = self.trainer.manifest
        self.base = self.trainer.get_tensors("exchanged")
        ds = Dataset.open(data, labels=self.manifest.task.labels, kind="classify")
        _, self.held_out = ds.split(0.5)
        self.lock = threading.Lock()
        self.calls = 0

    def __call__(self, tensors):
        from fedclip.device_agent.loops import evaluate

        with self.lock:
            self.calls += 1
            self.trainer.set_tensors(self.base if tensors is None else tensors)
            return evaluate(self.trainer, self.held_out, batch_size=64)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_bundle):
    """(evaluator, adapters): `good` trained on the held-out images, `bad` = good with random B."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST is not at /usr/share/datasets/fashion-mnist")
    images = _idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    labels = _idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    manifest = Manifest.load(tiny_bundle)
    root = tmp_path_factory.mktemp("fmnist-rollout")
    for c, name in enumerate(manifest.task.labels):
        folder = root / label_folder_name(name)
        folder.mkdir()
        for i in np.flatnonzero(labels == c)[:8]:
            Image.fromarray(images[i]).save(folder / f"{i}.png")
    ev = Evaluator(tiny_bundle, root)
    from fedclip.device_agent.loops import train_local

    ev.trainer.set_tensors(ev.base)
    train_local(ev.trainer, ev.held_out, epochs=15, batch_size=32, lr=1e-2, progress=False)
    good = ev.trainer.get_tensors("exchanged")
    rng = np.random.default_rng(0)
    bad = {
        k: (rng.normal(0, 3.0, v.shape).astype(np.float32) if k.endswith("lora_B") else v)
        for k, v in good.items()
    }
    bid = manifest.bundle_id

    def meta(v: str) -> AdapterMeta:
        return AdapterMeta(bid, v, "", 1, "fedavg", "lora")

    source = DictSource(
        {"good": (good, meta("good")), "good2": (dict(good), meta("good2")), "bad": (bad, meta("bad"))}
    )
    acc_base, acc_good = ev(None)["accuracy"], ev(good)["accuracy"]
    assert acc_good > acc_base + 0.2, (acc_base, acc_good)  # the setup itself must make sense
    return ev, source


# ---- harness agents and coordinator --------------------------------------------------------------
class HarnessAgent:
    """A minimal real agent: persistent MQTT session, retained status with groups, RolloutClient."""

    def __init__(
        self,
        url: str,
        agent_id: str,
        state: Path,
        public_key: Path,
        evaluate,
        groups=("site1",),
        baseline=None,
    ):
        self.url, self.id, self.state, self.public_key = url, agent_id, state, public_key
        self.evaluate, self.groups, self.baseline = evaluate, tuple(groups), baseline
        self.topics = Topics(FLEET)
        self.session: MqttSession | None = None
        self.client: RolloutClient | None = None
        self.changes: list[str | None] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _status(self, state: str) -> bytes:
        version = self.client.current_version if self.client else None
        body = {
            "state": state,
            "groups": list(self.groups),
            "adapter_version": version or "",
            "bundle_id": "",
        }
        return encode(Envelope(MsgType.STATUS, FLEET, self.id, body=body))

    def start(self) -> HarnessAgent:
        self._stop.clear()
        self.session = MqttSession(
            self.url,
            self.id,
            clean_session=False,
            will=Will(self.topics.status(self.id), self._status("offline")),
        )
        self.client = RolloutClient(
            self.session,
            self.topics,
            self.id,
            self.state,
            self.public_key,
            self.evaluate,
            on_change=lambda v, t: self.changes.append(v),
            baseline_fn=(lambda: self.baseline) if self.baseline else None,
        )
        self.session.connect(timeout=30)
        self.client.subscribe()
        self.session.publish(self.topics.status(self.id), self._status("online"), retain=True)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            incoming = self.session.get(timeout=0.1)
            if incoming is not None:
                assert self.client.handle(incoming)

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self.session:
            self.session.publish(self.topics.status(self.id), self._status("offline"), retain=True)
            self.session.close()

    @property
    def version(self) -> str | None:
        return self.client.current_version


def wait_for(cond, what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.fixture
def fleet(mosquitto, tmp_path, world):
    """(manager, agents dict, pubkey path, start_agent)."""
    ev, source = world
    key, pub = ensure_keypair(tmp_path / "keys")
    session = MqttSession(mosquitto.url, "coord-test", clean_session=False).connect(timeout=30)
    store = RolloutStore(tmp_path / "rollout.sqlite")
    manager = RolloutManager(session, Topics(FLEET), store, key, source)
    manager.subscribe()
    agents: dict[str, HarnessAgent] = {}

    def add(agent_id: str, groups=("site1",), start: bool = True) -> HarnessAgent:
        a = HarnessAgent(mosquitto.url, agent_id, tmp_path / "agents" / agent_id, pub, ev, groups)
        agents[agent_id] = a
        return a.start() if start else a

    yield manager, agents, add
    for a in agents.values():
        if a._thread is not None and a._thread.is_alive():
            a.stop()
    session.close()
    store.close()


def _fleet_view(manager, n: int):
    view = {}
    deadline = time.monotonic() + WAIT_S
    while len(view) < n and time.monotonic() < deadline:
        view.update(read_fleet(manager.session, manager.topics, quiet=0.3, timeout=3))
    return view


# ---- tests ---------------------------------------------------------------------------------------
def test_canary_passes_and_promotes_to_the_group(fleet):
    manager, agents, add = fleet
    for name in ("a", "b", "c"):
        add(name, groups=("site1", "cpu"))
    add("d", groups=("site2",))
    view = _fleet_view(manager, 4)
    assert view["d"].groups == ("site2",) and view["a"].online

    rid = manager.start(
        RolloutParams(
            "good",
            Target.parse("group:site1"),
            canary="1",
            max_regression=1.0,
            min_acks=1.0,
            stage_timeout=WAIT_S,
        ),
        view,
    )
    row = manager.wait(rid, timeout=WAIT_S)
    assert row.state == COMPLETE, row.reason
    stages = {s.name: s for s in manager.store.stages(rid)}
    assert len(stages["canary"].agents) == 1 and stages["canary"].state == "passed"
    assert stages["canary"].mean_regression < 0  # the trained adapter is better than the base one
    assert sorted(stages["rest"].agents + stages["canary"].agents) == ["a", "b", "c"]
    acks = {a.agent: a for a in manager.store.acks(rid)}
    assert sorted(acks) == ["a", "b", "c"]
    for ack in acks.values():
        assert ack.status == "installed" and ack.version == "good"
        assert ack.new_accuracy > ack.current_accuracy and ack.num_samples > 0
    for name in ("a", "b", "c"):
        assert agents[name].version == "good" and agents[name].changes == ["good"]
    assert agents["d"].version is None  # not in the group


def test_canary_regression_rolls_back_automatically(fleet):
    manager, agents, add = fleet
    for name in ("a", "b", "c"):
        add(name)
    view = _fleet_view(manager, 3)
    first = manager.start(RolloutParams("good", Target.parse("all"), canary="0", stage_timeout=WAIT_S), view)
    assert manager.wait(first, timeout=WAIT_S).state == COMPLETE

    rid = manager.start(
        RolloutParams("bad", Target.parse("all"), canary="1", max_regression=1.0, stage_timeout=WAIT_S), view
    )
    row = manager.wait(rid, timeout=WAIT_S)
    assert row.state == ROLLED_BACK
    assert "regression" in row.reason and "exceeds --max-regression 1" in row.reason
    canary = manager.store.stages(rid)[0]
    assert canary.name == "canary" and canary.state == "failed" and canary.mean_regression > 1.0
    assert [s.name for s in manager.store.stages(rid)] == ["canary"]  # never promoted
    (victim,) = canary.agents
    wait_for(lambda: agents[victim].version == "good", "the canary agent to roll back")
    wait_for(
        lambda: (drain(manager, 0.1), any(a.status == "rolled_back" for a in manager.store.acks(rid)))[1],
        "the rollback ack",
    )
    ack = manager.store.acks(rid)[0]
    assert ack.status == "rolled_back" and ack.new_accuracy is not None  # metrics of the canary kept
    assert agents[victim].changes == ["good", "bad", "good"]
    for name in set(agents) - {victim}:
        assert agents[name].changes == ["good"]
    # the rolled-back adapter's file is gone and a restarted agent does not take the retained copy again
    assert not list((agents[victim].state / "rollout" / "adapters").glob("bad.*"))
    agents[victim].stop()
    agents[victim].changes.clear()
    agents[victim].start()
    time.sleep(1.0)
    assert agents[victim].version == "good" and agents[victim].changes == []


def drain(manager, seconds: float = 0.5) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        msg = manager.session.get(timeout=0.05)
        if msg is not None:
            manager.handle(msg)


def test_offline_agent_catches_up_on_reconnect(fleet):
    manager, agents, add = fleet
    for name in ("a", "b", "c"):
        add(name)
    view = _fleet_view(manager, 3)
    agents["c"].stop()
    view = {k: v for k, v in view.items()}
    deadline = time.monotonic() + WAIT_S
    while view["c"].online and time.monotonic() < deadline:
        view.update(read_fleet(manager.session, manager.topics, quiet=0.3, timeout=3))
    assert not view["c"].online

    rid = manager.start(RolloutParams("good", Target.parse("all"), canary="1", stage_timeout=5), view)
    assert "c" not in manager.store.stages(rid)[0].agents  # canaries are chosen among online agents
    row = manager.wait(rid, timeout=WAIT_S)
    assert row.state == COMPLETE and "1 pending" in row.reason
    assert agents["c"].version is None

    agents["c"].start()  # same state dir, same client id: the retained adapter is waiting
    wait_for(lambda: agents["c"].version == "good", "the offline agent to catch up")
    wait_for(
        lambda: (drain(manager, 0.2), {a.agent for a in manager.store.acks(rid)} == {"a", "b", "c"})[1],
        "the late ack to be recorded",
    )


def test_pinned_agent_stays_put(fleet):
    manager, agents, add = fleet
    for name in ("a", "b", "c"):
        add(name)
    view = _fleet_view(manager, 3)
    manager.pin("c", "good")
    wait_for(lambda: agents["c"].version == "good" and agents["c"].client.pinned == "good", "the pin")

    rid = manager.start(RolloutParams("good2", Target.parse("all"), canary="0", stage_timeout=WAIT_S), view)
    assert manager.store.get(rid).skipped == ("c",)
    assert manager.wait(rid, timeout=WAIT_S).state == COMPLETE
    assert agents["a"].version == agents["b"].version == "good2"
    assert agents["c"].version == "good"
    # even a signed adapter that reaches a pinned agent is not installed
    manager._send_adapter(rid, "rest", "good2", "c")
    time.sleep(1.0)
    assert agents["c"].version == "good" and agents["c"].client.state["acks"][str(rid)]["status"] == "pinned"

    manager.unpin("c")
    wait_for(lambda: agents["c"].client.pinned is None, "the unpin")
    rid2 = manager.start(
        RolloutParams("good2", Target.parse("agents:c"), canary="0", stage_timeout=WAIT_S), view
    )
    assert manager.wait(rid2, timeout=WAIT_S).state == COMPLETE
    assert agents["c"].version == "good2"


def test_tampered_unsigned_and_wrongly_signed_adapters_are_refused(fleet, world, mosquitto):
    manager, agents, add = fleet
    ev, source = world
    a = add("a")
    topics = manager.topics
    tensors, meta = source.load_for("good", "a")
    body = {"rollout": 7, "stage": "rest", "version": "good", "bundle_id": meta.bundle_id}
    env = Envelope(MsgType.ADAPTER, FLEET, "a", body=body)

    good = encode(sign_envelope(manager.key, env, tensors), tensors)
    flipped = bytearray(good)
    flipped[-100] ^= 0x01  # one byte of one tensor
    wrong_key = encode(sign_envelope(generate_key(), env, tensors), tensors)
    unsigned = encode(env, tensors)
    other_agent = Envelope(MsgType.ADAPTER, FLEET, "b", body=body)
    for_b = encode(sign_envelope(manager.key, other_agent, tensors), tensors)
    evil_tensors = {k: v * 100 for k, v in tensors.items()}
    resigned_tensors = encode(decode(good, fleet=FLEET).envelope, evil_tensors)  # old signature, new tensors

    acks = MqttSession(mosquitto.url, "ack-watch", clean_session=True).connect(timeout=30)
    acks.subscribe(topics.ack("a"))
    for payload in (bytes(flipped), wrong_key, unsigned, for_b, resigned_tensors):
        manager.session.publish(topics.adapter("a"), payload, retain=True)
    time.sleep(1.0)
    assert a.version is None and a.changes == [] and ev.calls >= 0
    rejected = []
    while (m := acks.get(timeout=0.5)) is not None:
        rejected.append(decode(m.payload, fleet=FLEET).envelope.body)
    assert rejected and all(b["status"] == "rejected" for b in rejected)
    assert any("signature" in b["reason"] for b in rejected)

    manager.session.publish(topics.adapter("a"), good, retain=True)
    wait_for(lambda: a.version == "good", "the genuine adapter")
    acks.close()


@pytest.mark.slow
def test_rollout_cli_wait_status_pin(mosquitto, tmp_path, world):
    """`fedclip-coord rollout start FILE --wait` in a subprocess drives the state machine to the end."""
    ev, source = world
    state = tmp_path / "coord"
    _, pub = ensure_keypair(state / "keys")
    tensors, meta = source.load_for("good", "x")
    adapter_file = save_adapter(tmp_path / "good.safetensors", tensors, meta)
    # agent a had an adapter of its own before any rollout: a rollback returns it there
    agents = [
        HarnessAgent(mosquitto.url, n, tmp_path / "agents" / n, pub, ev, baseline=b).start()
        for n, b in (("a", ("own-r3", ev.base)), ("b", None), ("c", None))
    ]
    env = dict(os.environ, COLUMNS="200")
    common = ["--state", str(state), "--broker", mosquitto.url, "--fleet", FLEET]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "fedclip.coordinator.cli", "rollout", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=WAIT_S * 2,
        )

    try:
        wait_for(lambda: all(a.session.connected.is_set() for a in agents), "agents to connect")
        t0 = time.monotonic()
        r = cli(
            "start",
            str(adapter_file),
            "--to",
            "all",
            "--canary",
            "1",
            "--wait",
            "--stage-timeout",
            str(WAIT_S),
            *common,
        )
        elapsed = time.monotonic() - t0
        assert r.returncode == 0, r.stderr + r.stdout
        assert "complete" in r.stdout and "canary passed" in r.stdout
        assert all(a.version == "good" for a in agents)
        print(f"rollout to 3 agents via the CLI: {elapsed:.2f}s")

        r = cli("status", "--state", str(state))
        assert r.returncode == 0 and "good" in r.stdout and "complete" in r.stdout
        r = cli("status", "1", "--state", str(state))
        assert r.returncode == 0 and r.stdout.count("installed") == 3 and "canary" in r.stdout

        r = cli("pin", "c", str(adapter_file), *common)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: agents[2].client.pinned == "good", "the pin over the CLI")
        r = cli("status", "--state", str(state))
        assert "c=good" in r.stdout

        r = cli("rollback", "1", *common)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: agents[0].version == "own-r3" and agents[1].version is None, "the manual rollback")
        assert agents[0].changes == ["good", "own-r3"]
        time.sleep(0.5)
        assert agents[2].version == "good"  # pinned: stays put

        r = cli("start", "not-a-version!", "--to", "all", *common)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "VERSION" in r.stderr
        r = cli("start", str(adapter_file), "--to", "groups:x", *common)
        assert r.returncode == 2 and "--to" in r.stderr
        r = cli("status", "99", "--state", str(state))
        assert r.returncode == 2 and "does not exist" in r.stderr
    finally:
        for a in agents:
            a.stop()


def test_large_adapter_travels_by_url_and_is_checked(fleet, tmp_path):
    """Past the inline limit the signed message carries a URL + sha256; the bundle server serves it."""
    from fedclip.coordinator.bundle_server import BundleServer

    manager, agents, add = fleet
    a = add("a")
    served = tmp_path / "served"
    served.mkdir()
    with BundleServer(served) as server:
        manager.inline_limit, manager.url_root, manager.url_base = 1024, served, server.url
        rid = manager.start(
            RolloutParams("good", Target.parse("agents:a"), canary="0", stage_timeout=WAIT_S), {}
        )
        assert manager.wait(rid, timeout=WAIT_S).state == COMPLETE
        assert a.version == "good"
        # A corrupt file on the server is refused by its sha256: the agent keeps what it has. The
        # manager writes good2 where the server does not look; the server has a corrupted copy.
        from fedclip.sdk.adapters import adapter_bytes
        from fedclip.sdk.hashing import sha256_bytes

        manager.url_root = tmp_path / "unserved"
        blob = adapter_bytes(*manager.adapters.load_for("good2", "a"))
        bad = bytearray(blob)
        bad[-5] ^= 0x01
        (served / "adapters" / f"{sha256_bytes(blob)}.safetensors").write_bytes(bytes(bad))
        rid2 = manager.start(
            RolloutParams("good2", Target.parse("agents:a"), canary="0", stage_timeout=WAIT_S), {}
        )
        row = manager.wait(rid2, timeout=WAIT_S)
        assert row.state == COMPLETE and "0 of 1" in row.reason
        (ack,) = manager.store.acks(rid2)
        assert ack.status == "rejected" and "sha256" in ack.reason
        assert a.version == "good"
