"""Personal tuning yields to messages: how long a round's task waits when it arrives mid-tuning.

    python benchmarks/bench_personal_yield.py --model fedclip-tiny,ViT-B-32 \\
        --out benchmarks/results/personal_yield

An agent with `personal: {mu: 1.5}` (the agent's own code in one process over the in-memory
transport: real ONNX Runtime step training, a real state dir, FMNIST images of the official test
split, random-init weights) gets a signed rollout and tunes it; `--at` steps into that tuning a
round's task arrives. Measured, interleaved, `--repeats` times each:
- `tuning alone`: the tuning's wall time (first step to the copy kept), nothing arriving;
- `task, agent as built`: seconds from the task's arrival to its update being published, where the
  tuning pauses for it (checkpoint written) and resumes after (checkpoint read);
- `task, no yielding`: the same with yielding turned off (the agent before: the task waits for the
  rest of the tuning);
- `task, idle agent`: the same task sent to an agent with nothing else to do (the round's own time).
Beside them, whether the paused-and-resumed copy equals the uninterrupted one bit for bit.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import loadavg, machine, md_table, utc_now, write_json  # noqa: E402

FLEET, AGENT = "bench", "b1"
MODES = ("tuning alone", "task, agent as built", "task, no yielding", "task, idle agent")


def export(model: str, out: Path) -> Path:
    from fedclip.exporters.bundle import export_bundle
    from fedclip.exporters.config import ExportConfig
    from fedclip.sdk.partition import FASHION_MNIST_CLASSES

    export_bundle(ExportConfig(model=model, out=str(out), labels=FASHION_MNIST_CLASSES, format="step"))
    return out


def images(folder: Path, n: int) -> Path:
    from fedclip.sdk.data import label_folder_name
    from fedclip.sdk.partition import load_fashion_mnist

    data = load_fashion_mnist()
    for i in range(60_000, 60_000 + n):  # the official test split
        d = folder / label_folder_name(data.classes[int(data.labels[i])])
        d.mkdir(parents=True, exist_ok=True)
        data.image(i).save(d / f"{i:06d}.png")
    return folder


class Run:
    """One agent on a memory broker; the clock marks of one measurement."""

    def __init__(self, bundle: Path, data: Path, state: Path, keys: Path, args) -> None:
        from fedclip.device_agent.agent import Agent
        from fedclip.device_agent.config import AgentConfig
        from fedclip.device_agent.personal import PersonalTuning
        from fedclip.device_agent.rounds import RoundRunner
        from fedclip.sdk.manifest import Manifest
        from fedclip.sdk.signing import ensure_keypair
        from fedclip.sdk.transport import MemoryBroker
        from fedclip.sdk.wire import Topics

        self.key, pub = ensure_keypair(keys)
        self.manifest = Manifest.load(bundle)
        self.topics = Topics(FLEET)
        self.broker = MemoryBroker()
        tuning = PersonalTuning(mu=1.5, epochs=args.epochs, lr=5e-3, batch_size=args.batch)
        cfg = AgentConfig(broker="mqtt://127.0.0.1:1", fleet=FLEET, id=AGENT, bundle=bundle, data=data,
                          state=state, backend="step", threads=args.threads, holdout=0.25,
                          coordinator_key=pub, personal=tuning, progress=False)  # fmt: skip
        self.agent = Agent(cfg, self.broker.client(), RoundRunner.open(cfg, threading.Event()))
        self.coordinator = self.broker.client()
        self.coordinator.connect()
        self.marks: dict[str, float] = {}
        self._hook()
        assert self.agent.start()

    def _hook(self) -> None:
        """Clock marks: the tuning's first step, the update's publish, the copy kept."""
        trainer, state, transport = self.agent.runner.trainer, self.agent.runner.state, self.agent.transport
        step, keep, publish = trainer.train_step, state.keep_personal, transport.publish
        self.at: int | None = None

        def train_step(inputs):
            if trainer.prox_mu > 0:
                self.marks.setdefault("tuning from", time.perf_counter())
            loss = step(inputs)
            if self.at is not None and trainer.prox_mu > 0 and trainer.step == self.at:
                self.at = None
                self.send_task()
            return loss

        def keep_personal(*a, **kw):
            out = keep(*a, **kw)
            self.marks["copy kept"] = time.perf_counter()
            return out

        def publish_(topic, payload, *a, **kw):
            if topic == self.topics.update(AGENT):
                self.marks["update"] = time.perf_counter()
            return publish(topic, payload, *a, **kw)

        trainer.train_step, state.keep_personal, transport.publish = train_step, keep_personal, publish_

    def adapter(self, seed: int) -> dict:
        rng = np.random.default_rng(seed)
        return {s.name: (0.01 * rng.standard_normal(s.shape)).astype(s.dtype)
                for s in self.manifest.exchanged}  # fmt: skip

    def rollout(self) -> None:
        from fedclip.sdk.signing import sign_envelope
        from fedclip.sdk.wire import Envelope, MsgType, encode

        tensors = self.adapter(11)
        body = {"rollout": 1, "stage": "rest", "version": "r1", "bundle_id": self.manifest.bundle_id}
        env = Envelope(MsgType.ADAPTER, FLEET, AGENT, base_version="r1", body=body)
        blob = encode(sign_envelope(self.key, env, tensors), tensors)
        self.coordinator.publish(self.topics.adapter(AGENT), blob)

    def send_task(self) -> None:
        from fedclip.sdk import messages

        hp = messages.Hyperparameters(1, 5e-3, 32)
        task = messages.Task(1, self.manifest.bundle_id, time.time() + 3600, hp, base_version="start-1",
                             adapter=self.adapter(1))  # fmt: skip
        self.marks["task"] = time.perf_counter()
        self.coordinator.publish(self.topics.task(AGENT), messages.encode(task, FLEET, AGENT, key=self.key))

    def until(self, *marks: str, limit: float = 3600) -> None:
        end = time.monotonic() + limit
        while not all(m in self.marks for m in marks):
            if time.monotonic() > end:
                raise TimeoutError(f"no {marks} within {limit} s")
            self.agent.poll(timeout=0.05)

    def copy(self) -> dict:
        from fedclip.sdk.adapters import load_adapter
        from fedclip.sdk.ledger import Ledger

        entry = Ledger.read(self.agent.runner.state.root).entry("r1")
        return load_adapter(entry.personal)[0]

    def close(self) -> None:
        self.agent.shutdown()
        self.coordinator.close()


def measure(mode: str, bundle: Path, data: Path, work: Path, args) -> tuple[float, dict | None]:
    state = Path(tempfile.mkdtemp(dir=work))
    run = Run(bundle, data, state / "state", work / "keys", args)
    try:
        if mode == "task, idle agent":
            run.rollout()
            run.until("copy kept")
            run.send_task()
            run.until("update")
            return run.marks["update"] - run.marks["task"], None
        if mode == "tuning alone":
            run.rollout()
            run.until("copy kept")
            return run.marks["copy kept"] - run.marks["tuning from"], run.copy()
        if mode == "task, no yielding":
            run.agent.transport.waiting = lambda: False  # type: ignore[method-assign]  # the agent before
        run.at = args.at
        run.rollout()
        run.until("update", "copy kept")
        return run.marks["update"] - run.marks["task"], run.copy()
    finally:
        run.close()
        shutil.rmtree(state, ignore_errors=True)


def run_model(model: str, work: Path, args) -> dict:
    t = time.perf_counter()
    bundle = export(model, work / f"bundle-{model}")
    export_s = time.perf_counter() - t
    data = images(work / "images", args.images)
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    copies: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(args.repeats):
        for mode in MODES:  # interleaved: a drift in the machine's load lands on every mode alike
            s, copy = measure(mode, bundle, data, work, args)
            seconds[mode].append(s)
            if copy is not None:
                copies[mode].append(copy)
            print(f"{model} #{r + 1} {mode}: {s:.2f} s (load {loadavg()[0]:.1f})", flush=True)
    ref = copies["tuning alone"][0]
    same = all(
        all(np.array_equal(c[k], ref[k]) for k in ref)
        for m in ("tuning alone", "task, agent as built", "task, no yielding")
        for c in copies[m]
    )
    shutil.rmtree(bundle, ignore_errors=True)
    return {"seconds": seconds, "copies_identical": same, "export_s": export_s}


def report(doc: dict) -> str:
    a = doc["args"]
    lines = [
        "# Personal tuning yields to messages (`bench_personal_yield.py`)",
        "",
        f"{utc_now()}; {doc['machine']['cpu_model']}, {doc['machine']['nproc']} CPUs; "
        f"{a['threads']} threads; load average at the start "
        f"{doc['load_before'][0]:.1f}, at the end {doc['load_after'][0]:.1f}.",
        f"Command: `{doc['command']}`",
        "",
        f"An agent with `personal: {{mu: 1.5, epochs: {a['epochs']}, batch_size: {a['batch']}}}` on "
        f"{a['images']} FMNIST images (a quarter held out), random-init weights, tunes a signed "
        f"rollout; {a['at']} steps into the tuning a round's task (1 epoch, batch 32) arrives. "
        f"Seconds, median of {a['repeats']} interleaved runs (min-max):",
        "",
    ]
    rows = []
    for model, res in doc["models"].items():
        s = res["seconds"]
        med = {m: statistics.median(v) for m, v in s.items()}
        cells = [f"{med[m]:.2f} ({min(s[m]):.2f}-{max(s[m]):.2f})" for m in MODES]
        wait_ratio = med["task, no yielding"] / med["task, agent as built"]
        rows.append([model, *cells, f"{wait_ratio:.1f}x", "yes" if res["copies_identical"] else "**no**"])
    head = ["model", *MODES, "wait: no yielding / as built", "copies bit-identical"]
    lines += [md_table(head, rows), ""]
    lines.append(
        "`task, idle agent` is the round's own time (its training and the held-out evaluations around "
        "it): what the task costs with nothing else to do. As built, the task waits at most one tuning "
        "step more, plus the pause's checkpoint; without yielding it waited for the rest of the tuning."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fedclip-tiny,ViT-B-32")
    ap.add_argument("--images", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=3, help="personal.epochs")
    ap.add_argument("--batch", type=int, default=32, help="personal.batch_size")
    ap.add_argument("--at", type=int, default=2, help="the tuning step the task arrives at")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, required=True, help="writes <out>.json and <out>.md")
    args = ap.parse_args()
    doc = {"command": "python benchmarks/bench_personal_yield.py " + " ".join(sys.argv[1:]),
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "machine": machine(), "load_before": loadavg(), "models": {}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="fedclip-yield-") as tmp:
        for model in args.model.split(","):
            doc["models"][model] = run_model(model, Path(tmp), args)
            shutil.rmtree(Path(tmp) / "images", ignore_errors=True)
    doc["load_after"] = loadavg()
    write_json(args.out.with_suffix(".json"), doc)
    args.out.with_suffix(".md").write_text(report(doc))
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
