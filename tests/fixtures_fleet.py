"""Fleet fixtures: a scripted coordinator stand-in over a real broker and `fedclip-agent start` as a
real subprocess (`coordinator_factory`, `agent_factory`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from waiting import WAIT_S, eventually

from fedclip.device_agent.state import read_record
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.mqtt import MqttSession
from fedclip.sdk.signing import sign_envelope
from fedclip.sdk.wire import Envelope, Message, MsgType, Topics, decode, encode

__all__ = ["FLEET", "AgentProc", "Coordinator", "agent_factory", "coordinator_factory"]

FLEET = "fleet1"


# ---- the coordinator stand-in ---------------------------------------------------------------------
class Coordinator:
    """Publishes tasks and records every update/status/ack it sees, keyed by agent and round."""

    def __init__(self, url: str, manifest: Manifest, **session_kw):
        self.manifest = manifest
        self.topics = Topics(FLEET)
        self.session = MqttSession(url, "coordinator-stand-in", clean_session=False, **session_kw)
        self.session.connect(timeout=30)
        for kind in ("update", "status", "ack"):
            self.session.subscribe(self.topics.all_agents(kind), qos=1)
        self.updates: list[tuple[str, int, bytes]] = []
        self.statuses: list[Message] = []
        self.acks: list[Message] = []

    def close(self) -> None:
        self.session.close()

    def pump(self, timeout: float = 0.2) -> None:
        incoming = self.session.get(timeout)
        while incoming is not None:
            if incoming.payload:
                agent, kind = self.topics.parse_agent(incoming.topic)
                msg = decode(incoming.payload, fleet=FLEET)
                if kind == "update":
                    self.updates.append((agent, msg.envelope.round, incoming.payload))
                elif kind == "status":
                    self.statuses.append(msg)
                elif kind == "ack":
                    self.acks.append(msg)
            incoming = self.session.get(0)

    def wait(self, cond, what: str, agent: AgentProc | None = None, timeout: float = WAIT_S):
        """`cond()`'s first truthy value, pumping messages meanwhile; fails early if `agent` exits."""

        def check():
            self.pump()
            result = cond()
            if not result and agent is not None and agent.proc.poll() is not None:
                pytest.fail(
                    f"agent exited ({agent.proc.returncode}) while waiting for {what}:\n{agent.tail()}"
                )
            return result

        return eventually(check, timeout, lambda: what + (f":\n{agent.tail()}" if agent else ""), interval=0)

    def update_blobs(self, agent: str, rnd: int) -> list[bytes]:
        return [b for a, r, b in self.updates if a == agent and r == rnd]

    def wait_update(self, agent: AgentProc, rnd: int) -> Message:
        blob = self.wait(
            lambda: (self.update_blobs(agent.id, rnd) or [None])[0], f"update of round {rnd}", agent
        )
        return decode(blob, fleet=FLEET, expect=MsgType.UPDATE)

    def last_status(self, agent: str) -> Message | None:
        mine = [m for m in self.statuses if m.envelope.agent == agent]
        return mine[-1] if mine else None

    def wait_status(self, agent: AgentProc, pred, what: str) -> Message:
        def check():
            st = self.last_status(agent.id)
            return st if st is not None and pred(st.envelope.body) else None

        return self.wait(check, what, agent)

    def starting_adapter(self, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {
            s.name: (0.01 * rng.standard_normal(s.shape)).astype(s.dtype) for s in self.manifest.exchanged
        }

    def task_blob(
        self,
        agent: str,
        rnd: int,
        *,
        epochs: int = 1,
        bundle_id: str | None = None,
        tensors: dict | None = None,
        fleet: str = FLEET,
        key=None,
        **body,
    ) -> bytes:
        """A task message; signed with `key` (the coordinator's private key) when given."""
        body = {
            "bundle_id": bundle_id or self.manifest.bundle_id,
            "deadline": time.time() + 3600,
            "hyperparameters": {"epochs": epochs, "lr": 1e-3, "batch_size": 8},
            "stats": ["histogram"],
            "noise_std": 0.0,
        } | body
        env = Envelope(MsgType.TASK, fleet, agent, round=rnd, base_version=f"start-{rnd}", body=body)
        tensors = self.starting_adapter(rnd) if tensors is None else tensors
        if key is not None:
            env = sign_envelope(key, env, tensors)
        return encode(env, tensors)

    def send_task(self, agent: str, rnd: int, **kw) -> bytes:
        blob = self.task_blob(agent, rnd, **kw)
        self.publish(self.topics.task(agent), blob, retain=True)
        return blob

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.session.publish(topic, payload, qos=1, retain=retain, timeout=30)


@pytest.fixture
def coordinator_factory(tiny_bundle):
    made: list[Coordinator] = []

    def make(url: str, bundle: Path | None = None, **session_kw) -> Coordinator:
        c = Coordinator(url, Manifest.load(bundle or tiny_bundle), **session_kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


# ---- the agent process ----------------------------------------------------------------------------
class AgentProc:
    def __init__(self, workdir: Path, args: list[str], agent_id: str, state: Path):
        self.id = agent_id
        self.state = state
        workdir.mkdir(parents=True, exist_ok=True)
        n = len(list(workdir.glob("agent-*.log")))
        self.log = workdir / f"agent-{n}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedclip.device_agent.cli", "start", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=os.environ | {"PYTHONUNBUFFERED": "1"},
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-n:])

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def progress(self) -> dict | None:
        try:
            return read_record(self.state)["in_progress"]
        except Exception:  # mid-replace reads are impossible, but the file may not exist yet
            return None


@pytest.fixture
def agent_factory(tmp_path, tiny_bundle, fmnist_dir):
    started: list[AgentProc] = []

    def start(
        url: str,
        agent_id: str = "dev-1",
        *,
        state: Path | None = None,
        config: dict | None = None,
        extra: tuple[str, ...] = (),
        bundle: Path | None = None,
    ):
        state = state or tmp_path / f"state-{agent_id}"
        args = [
            "--broker",
            url,
            "--fleet",
            FLEET,
            "--id",
            agent_id,
            "--bundle",
            str(bundle or tiny_bundle),
            "--data",
            str(fmnist_dir),
            "--state",
            str(state),
            "--threads",
            "1",
            *extra,
        ]
        if config is not None:
            cfg = tmp_path / f"{agent_id}.yaml"
            cfg.write_text(yaml.safe_dump(config))
            args = ["--config", str(cfg), *args]
        agent = AgentProc(tmp_path / "logs", args, agent_id, state)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()
