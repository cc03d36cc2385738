"""Rollout timings: a canary rollout to 3 real agents, and the coordinator's ack throughput.

1. Rollout to 3 agents: a real mosquitto, the coordinator's RolloutManager, and 3 agents (real
   MqttSession + RolloutClient, ONNX Runtime evaluation of the tiny bundle on Fashion-MNIST held-out
   images, new vs current). Canary 1 agent, then the other 2; timed from `start` to `complete`.
2. 1,000 simulated acknowledgements: a rollout to 1,000 agents (signing and publishing 1,000
   retained adapters), then 1,000 ACK messages published to the broker by a simulator; timed until
   the coordinator has validated and recorded all of them and decided the stage. Also `handle` alone
   (decode + validate + SQLite upsert) on pre-encoded messages, without the broker.

    python benchmarks/bench_rollout.py [--bundle DIR] [--out benchmarks/results/rollout]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the test harness agent (one implementation, reused)


def _bundle(path: str | None, work: Path) -> Path:
    if path:
        return Path(path)
    from fixtures_bundle import FASHION_MNIST_LABELS

    from fedclip.exporters.bundle import export_bundle
    from fedclip.exporters.config import ExportConfig

    out = work / "bundle"
    export_bundle(
        ExportConfig(
            model="fedclip-tiny",
            out=str(out),
            adapter="lora",
            rank=4,
            alpha=8.0,
            targets=("q", "v"),
            towers=("vision", "text"),
            task="classify",
            labels=FASHION_MNIST_LABELS,
        )
    )
    return out


def _data(bundle: Path, work: Path) -> Path:
    from PIL import Image
    from test_rollout import FMNIST, _idx

    from fedclip.sdk.data import label_folder_name
    from fedclip.sdk.manifest import Manifest

    images = _idx(FMNIST / "t10k-images-idx3-ubyte.gz")
    labels = _idx(FMNIST / "t10k-labels-idx1-ubyte.gz")
    root = work / "data"
    for c, name in enumerate(Manifest.load(bundle).task.labels):
        folder = root / label_folder_name(name)
        folder.mkdir(parents=True)
        for i in np.flatnonzero(labels == c)[:8]:
            Image.fromarray(images[i]).save(folder / f"{i}.png")
    return root


def rollout_to_three(url: str, bundle: Path, work: Path, repeats: int) -> dict:
    from fixtures_rollout import FLEET, Evaluator, HarnessAgent

    from fedclip.coordinator.fleet import read_fleet
    from fedclip.coordinator.rollout import RolloutManager
    from fedclip.coordinator.rollout_policy import RolloutParams, Target
    from fedclip.coordinator.rollout_sources import DictSource
    from fedclip.coordinator.rollout_store import RolloutStore
    from fedclip.device_agent.loops import train_local
    from fedclip.sdk.adapters import AdapterMeta
    from fedclip.sdk.mqtt import MqttSession
    from fedclip.sdk.signing import ensure_keypair
    from fedclip.sdk.wire import Topics

    ev = Evaluator(bundle, _data(bundle, work))
    train_local(ev.trainer, ev.held_out, epochs=5, batch_size=32, lr=1e-2, progress=False)
    good = ev.trainer.get_tensors("exchanged")
    bid = ev.manifest.bundle_id
    source = DictSource({f"v{i}": (good, AdapterMeta(bid, f"v{i}")) for i in range(repeats)})
    key, pub = ensure_keypair(work / "keys")
    session = MqttSession(url, "bench-coord", clean_session=True).connect()
    manager = RolloutManager(
        session, Topics(FLEET), RolloutStore(work / "r3.sqlite"), key, source, on_event=lambda rid, text: None
    )
    manager.subscribe()
    agents = [HarnessAgent(url, n, work / "agents" / n, pub, ev).start() for n in ("a", "b", "c")]
    fleet = {}
    while len(fleet) < 3:
        fleet.update(read_fleet(session, manager.topics, quiet=0.3, timeout=3))
    runs, stage_s = [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        rid = manager.start(RolloutParams(f"v{i}", Target.parse("all"), canary="1", stage_timeout=120), fleet)
        row = manager.wait(rid, timeout=300, poll=0.01)
        runs.append(time.perf_counter() - t0)
        assert row.state == "complete", row.reason
        stages = manager.store.stages(rid)
        stage_s.append([s.decided_at - s.started_at for s in stages])
    for a in agents:
        a.stop()
    session.close()
    return {
        "agents": 3,
        "canary": 1,
        "repeats": repeats,
        "seconds_median": statistics.median(runs),
        "seconds_all": runs,
        "stage_seconds_median": {
            "canary": statistics.median(s[0] for s in stage_s),
            "rest": statistics.median(s[1] for s in stage_s),
        },
        "evaluations_per_agent_per_rollout": 2,
        "held_out_images": len(ev.held_out),
    }


def thousand_acks(url: str, work: Path, n: int = 1000) -> dict:
    from fedclip.coordinator.fleet import AgentInfo
    from fedclip.coordinator.rollout import RolloutManager
    from fedclip.coordinator.rollout_policy import RolloutParams, Target
    from fedclip.coordinator.rollout_sources import DictSource
    from fedclip.coordinator.rollout_store import RolloutStore
    from fedclip.sdk.adapters import AdapterMeta
    from fedclip.sdk.mqtt import Incoming, MqttSession
    from fedclip.sdk.signing import generate_key
    from fedclip.sdk.wire import Envelope, MsgType, Topics, encode

    rng = np.random.default_rng(0)
    # a realistic small adapter: rank 4 on q,v of 4 blocks, width 64 (the tiny bundle's size)
    tensors = {
        f"blk{i}.{p}.lora_{ab}": rng.normal(size=(4, 64) if ab == "A" else (64, 4)).astype(np.float32)
        for i in range(4)
        for p in ("q", "v")
        for ab in "AB"
    }
    source = DictSource({"v1": (tensors, AdapterMeta("b" * 64, "v1"))})
    fleet = {f"agent{i:04d}": AgentInfo(f"agent{i:04d}") for i in range(n)}
    topics = Topics("bench")

    def ack(agent: str, rid: int) -> bytes:
        body = {
            "rollout": rid,
            "status": "installed",
            "version": "v1",
            "metrics": {
                "new": {"accuracy": 0.71, "loss": 0.9, "num_samples": 40},
                "current": {"accuracy": 0.70, "loss": 0.95, "num_samples": 40},
            },
        }
        return encode(Envelope(MsgType.ACK, "bench", agent, body=body))

    out = {"acks": n, "adapter_bytes": int(sum(t.nbytes for t in tensors.values()))}

    # (a) handle() alone: decode + validate + SQLite upsert (no broker)
    class _Null:
        def publish(self, *a, **k):
            pass

        def subscribe(self, *a, **k):
            pass

    m = RolloutManager(
        _Null(),
        topics,
        RolloutStore(work / "acks-a.sqlite"),
        generate_key(),
        source,
        on_event=lambda rid, text: None,
    )
    rid = m.start(RolloutParams("v1", Target.parse("all"), canary="0", stage_timeout=600), fleet)
    msgs = [Incoming(topics.ack(a), ack(a, rid), False) for a in fleet]
    t0 = time.perf_counter()
    for msg in msgs:
        m.handle(msg)
    m.tick()
    out["handle_only_seconds"] = time.perf_counter() - t0
    assert m.store.get(rid).state == "complete"

    # (b) through mosquitto: start (sign + publish 1,000 retained adapters), then 1,000 acks
    session = MqttSession(url, "bench-coord-acks", clean_session=True).connect()
    m = RolloutManager(
        session,
        topics,
        RolloutStore(work / "acks-b.sqlite"),
        generate_key(),
        source,
        on_event=lambda rid, text: None,
    )
    m.subscribe()
    t0 = time.perf_counter()
    rid = m.start(RolloutParams("v1", Target.parse("all"), canary="0", stage_timeout=600), fleet)
    out["start_publish_seconds"] = time.perf_counter() - t0
    sim = MqttSession(url, "bench-sim", clean_session=True).connect()
    payloads = [(topics.ack(a), ack(a, rid)) for a in fleet]
    t0 = time.perf_counter()
    for topic, payload in payloads:
        sim.publish(topic, payload, qos=1, timeout=30)
    published = time.perf_counter() - t0
    row = m.wait(rid, timeout=300, poll=0.01)
    out["broker_end_to_end_seconds"] = time.perf_counter() - t0
    out["simulator_publish_seconds"] = published
    assert row.state == "complete", row.reason
    assert len(m.store.acks(rid)) == n
    # clear the 1,000 retained adapters so the broker is left as found
    for a in fleet:
        session.publish(topics.adapter(a), b"", qos=1, retain=True)
    sim.close()
    session.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", help="an exported classify bundle (default: export fedclip-tiny)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rollout"))
    args = parser.parse_args()
    from fedclip.sdk.broker_mosquitto import MosquittoBroker

    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as tmp:
        work = Path(tmp)
        bundle = _bundle(args.bundle, work)
        broker = MosquittoBroker()
        broker.start()
        try:
            result = {
                "load_average_at_start": os.getloadavg(),
                "machine": {
                    "python": platform.python_version(),
                    "cpu": platform.processor() or platform.machine(),
                    "system": platform.system(),
                },
                "rollout_3_agents": rollout_to_three(broker.url, bundle, work, args.repeats),
                "acks_1000": thousand_acks(broker.url, work),
            }
        finally:
            broker.cleanup()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    r3, a = result["rollout_3_agents"], result["acks_1000"]
    md = [
        "# Rollout benchmark",
        "",
        "`python benchmarks/bench_rollout.py` (real mosquitto, real ORT evaluation, tiny bundle).",
        "",
        "| measurement | seconds |",
        "|---|---|",
        f"| rollout to 3 agents, canary 1 then 2 (median of {r3['repeats']}) | {r3['seconds_median']:.2f} |",
        f"| of which canary stage | {r3['stage_seconds_median']['canary']:.2f} |",
        f"| of which rest stage | {r3['stage_seconds_median']['rest']:.2f} |",
        f"| 1,000 acks: `handle` + decision, no broker | {a['handle_only_seconds']:.2f} |",
        f"| 1,000 acks through mosquitto, publish to decision | {a['broker_end_to_end_seconds']:.2f} |",
        f"| start to 1,000 agents: sign + publish 1,000 retained adapters ({a['adapter_bytes']} B each) "
        f"| {a['start_publish_seconds']:.2f} |",
        "",
        f"Machine: {result['machine']['cpu']}, load average {result['load_average_at_start'][0]:.1f} "
        "at the start "
        "(shared with other jobs: treat the numbers as upper bounds).",
        "",
        f"Each agent evaluates the new and the current adapter on {r3['held_out_images']} held-out images "
        "before it acknowledges; that evaluation dominates the stage times.",
        "",
    ]
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
