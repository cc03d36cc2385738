"""Rollout fixtures: `world` (a real ORT evaluator on Fashion-MNIST and the `good` / `bad` adapters it
judges) and `HarnessAgent`, a minimal real agent (MqttSession + AgentState + RolloutClient) run on a
thread."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from fixtures_data import write_label_folders

from fedclip.coordinator.rollout_sources import DictSource
from fedclip.device_agent.rollout_client import RolloutClient
from fedclip.device_agent.state import AgentState
from fedclip.device_agent.status import software_versions
from fedclip.sdk.adapters import AdapterMeta
from fedclip.sdk.data import Dataset
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import MqttSession, Will
from fedclip.sdk.wire import Envelope, MsgType, Topics, encode

__all__ = ["FLEET", "Evaluator", "HarnessAgent", "world"]

FLEET = "fleet1"


# ---- data, adapters, evaluation (real ORT) -------------------------------------------------------
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
    manifest = Manifest.load(tiny_bundle)
    root = write_label_folders(tmp_path_factory.mktemp("fmnist-rollout"), manifest.task.labels, 8)
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
    """A minimal real agent: persistent MQTT session, retained status with groups, its own state dir
    (the adapter ledger) and a RolloutClient. `baseline` (version, tensors): an adapter of its own in
    use before any rollout. `changes`: every version inference switched to, in order."""

    def __init__(
        self,
        url: str,
        agent_id: str,
        state: Path,
        public_key: Path,
        evaluate,
        groups=("site1",),
        baseline=None,
        older: bool = False,
    ):
        self.url, self.id, self.state, self.public_key = url, agent_id, state, public_key
        # `older`: its status names no wire features, as an agent before fallbacks (it still takes them)
        self.older = older
        self.evaluate, self.groups, self.baseline = evaluate, tuple(groups), baseline
        self.topics = Topics(FLEET)
        self.session: MqttSession | None = None
        self.agent_state: AgentState | None = None
        self.client: RolloutClient | None = None
        self._changes: list[str | None] = []
        # Held while a message is handled: the ack goes out inside `handle`, so a reader that saw
        # the ack (the rollout completed) waits here until the switch is recorded too.
        self._handling = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _status(self, state: str) -> bytes:
        version = self.client.current_version if self.client else None
        body = {
            "state": state,
            "groups": list(self.groups),
            "adapter_version": version or "",
            "bundle_id": "",
            # what a real agent says it is and takes (device_agent.status.software_versions)
            "versions": {} if self.older else software_versions(),
        }
        return encode(Envelope(MsgType.STATUS, FLEET, self.id, body=body))

    def start(self) -> HarnessAgent:
        self._stop.clear()
        self.agent_state = AgentState(self.state, agent_id=self.id, fleet=FLEET, bundle_id="harness")
        if self.baseline and self.agent_state.current_adapter is None:
            version, tensors = self.baseline
            meta = AdapterMeta("harness", version)
            self.agent_state.install_adapter(version, tensors, meta, source="adapter")
        self.session = MqttSession(
            self.url,
            self.id,
            clean_session=False,
            will=Will(self.topics.status(self.id), self._status("offline")),
        )
        self.client = RolloutClient(
            self.session, self.topics, self.id, self.agent_state, self.public_key, self.evaluate
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
                with self._handling:
                    before = self.client.current_version
                    assert self.client.handle(incoming)
                    if self.client.current_version != before:
                        self._changes.append(self.client.current_version)

    @property
    def changes(self) -> list[str | None]:
        """Every version inference switched to, in order (the list itself: tests may clear it)."""
        with self._handling:
            return self._changes

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=10)
        if self.session:
            self.session.publish(self.topics.status(self.id), self._status("offline"), retain=True)
            self.session.close()
        if self.agent_state:
            self.agent_state.close()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def version(self) -> str | None:
        with self._handling:
            return self.client.current_version
