"""Step graph vs onnxruntime-training vs PyTorch: step time, peak memory, export time, bundle size.

    python benchmarks/bench_step.py --model ViT-B-32 --batch 8 --threads 2 --steps 10
    python benchmarks/bench_step.py --model fedclip-tiny,ViT-B-32
    python benchmarks/bench_step.py --model fedclip-tiny,ViT-B-32 --only step,step-prox \
        --out benchmarks/results/step_prox     # what personal tuning's proximal term costs a step

Random-init weights (no downloads). Each trainer runs in its own subprocess so peak RSS is its own.
Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELS = tuple(f"class {i}" for i in range(10))
ORT_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "checkpoint")
STEP_FILES = ("step_model.onnx", "step_eval_model.onnx", "initial_tensors.safetensors", "weights.bin")
# step-prox: the step backend with the proximal term on (personal tuning, `StepTrainer.set_prox`)
WORKERS = ("step", "step-prox", "ort-training", "torch-lora", "torch-full")


def _peak_rss_mb() -> float:
    # VmHWM is this process image's own peak; ru_maxrss would carry the parent's from before exec.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _batch(manifest_or_size, batch: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    size = manifest_or_size
    return {
        "image": rng.standard_normal((batch, 3, size, size)).astype(np.float32),
        "labels": rng.integers(0, len(LABELS), batch).astype(np.int64),
    }


def _timed(step, steps: int, warmup: int) -> list[float]:
    for i in range(warmup):
        step(i)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        step(warmup + i)
        times.append(time.perf_counter() - t0)
    return times


def worker(kind: str, bundle: Path, model: str, batch: int, threads: int, steps: int, warmup: int) -> dict:
    """Runs in a fresh interpreter: load, train `warmup + steps` steps, report times and peak RSS."""
    if kind in ("step", "step-prox", "ort-training"):
        from fedclip.device_agent.step_backend import make_trainer

        trainer = make_trainer(bundle, backend=kind.removesuffix("-prox"), threads=threads)
        if kind == "step-prox":
            trainer.set_prox(trainer.get_tensors("trainable"), 1.5)
        size = trainer.manifest.preprocess.image_size
        batches = [_batch(size, batch, s) for s in range(3)]
        trainer.set_lr(1e-4)
        losses = []
        times = _timed(lambda i: losses.append(trainer.train_step(batches[i % 3])), steps, warmup)
        trainer.eval_step(batches[0])  # an agent evaluates every round: its graph counts in the peak
        torch_loaded = "torch" in sys.modules
    else:
        import torch

        from fedclip.exporters import tasks
        from fedclip.exporters.bundle import adapter_spec, build_adapted_model, task_spec, tokenize
        from fedclip.exporters.config import ExportConfig

        torch.set_num_threads(threads)
        cfg = ExportConfig(model=model, out="-", labels=LABELS)
        adapted = build_adapted_model(model, adapter_spec(cfg))
        clip = adapted.model
        if kind == "torch-full":
            for p in clip.parameters():
                p.requires_grad_(True)
        prompts = task_spec(cfg).prompts()  # the bundle's class prompts, so all trainers fit one task
        module = tasks.ClassifyGraph(clip, tokenize(prompts, adapted.base.context_length), False, True)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, eps=1e-6, weight_decay=0.0)
        size = adapted.base.preprocess.image_size
        batches = [{k: torch.from_numpy(v) for k, v in _batch(size, batch, s).items()} for s in range(3)]
        losses = []

        def step(i: int) -> None:
            opt.zero_grad(set_to_none=True)
            loss, _ = module(batches[i % 3]["image"], batches[i % 3]["labels"])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))

        times = _timed(step, steps, warmup)
        with torch.no_grad():
            module(batches[0]["image"], batches[0]["labels"])
        torch_loaded = True
    return {
        "kind": kind,
        "step_ms_median": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times),
        "peak_rss_mb": _peak_rss_mb(),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "torch_in_process": torch_loaded,
    }


def _sizes(bundle: Path, files) -> int:
    return sum((bundle / f).stat().st_size for f in files if (bundle / f).exists())


def export(model: str, work: Path) -> dict:
    from fedclip.exporters.bundle import export_bundle
    from fedclip.exporters.config import ExportConfig
    from fedclip.exporters.step_bundle import add_step_format

    bundle = work / "bundle"
    t0 = time.perf_counter()
    export_bundle(ExportConfig(model=model, out=str(bundle), labels=LABELS))
    ort_s = time.perf_counter() - t0
    inference_embedded = (bundle / "inference_model.onnx").stat().st_size
    ort_bytes = _sizes(bundle, ORT_FILES)
    t0 = time.perf_counter()
    add_step_format(bundle)
    step_s = time.perf_counter() - t0
    step_bytes = _sizes(bundle, STEP_FILES) + (bundle / "inference_model.onnx").stat().st_size
    return {
        "bundle": str(bundle),
        "export_s": {"ort-training (+inference)": ort_s, "step (add_step_format)": step_s},
        "bytes": {
            "inference graph, weights embedded": inference_embedded,
            "ort-training artifacts": ort_bytes,
            "step format incl. inference (shared weights.bin)": step_bytes,
            "weights.bin": (bundle / "weights.bin").stat().st_size,
            "whole bundle": sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file()),
        },
    }


def _prox_ratio(trainers: list[dict]) -> list[str]:
    """With step and step-prox rows (repeated, interleaved: `--only step,step-prox,step,step-prox`):
    the ratio of their median step times, and of their peak RSS (the proximal term's cost)."""
    ok = [r for r in trainers if "error" not in r]
    rows = {k: [r for r in ok if r["kind"] == k] for k in ("step", "step-prox")}
    if not all(rows.values()):
        return []

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[kind])

    t = med("step-prox", "step_ms_median") / med("step", "step_ms_median")
    m = med("step-prox", "peak_rss_mb") / med("step", "peak_rss_mb")
    n = len(rows["step"])
    return ["", f"step-prox / step, the median over {n} interleaved run(s) of each: step time {t:.2f}x, "
            f"peak RSS {m:.2f}x (the proximal term: 3 ops per tensor, anchors fed every step)"]  # fmt: skip


def _markdown(res: dict) -> str:
    a = res["args"]
    lines = [
        f"# Step graph benchmark: {a['model']}, batch {a['batch']}, {a['threads']} threads, CPU",
        "",
        f"{res['platform']}; random-init weights; median of {a['steps']} steps",
        f"after {a['warmup']} warm-up steps;",
        "each trainer in its own process (peak RSS = that process's VmHWM, after the timed steps",
        "and one evaluation batch, as an agent round does).",
        "",
        "| trainer | step ms (median) | step ms (min) | peak RSS MB | loss first -> last | torch loaded |",
        "|---|---:|---:|---:|---|---|",
    ]
    for r in res["trainers"]:
        if "error" in r:
            lines.append(f"| {r['kind']} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {r['kind']} | {r['step_ms_median']:.1f} | {r['step_ms_min']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} | {'yes' if r['torch_in_process'] else 'no'} |"
        )
    lines += _prox_ratio(res["trainers"])
    lines += ["", "| export | seconds |", "|---|---:|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in res["export"]["export_s"].items()]
    lines += ["", "| files | MB |", "|---|---:|"]
    lines += [f"| {k} | {v / 2**20:.1f} |" for k, v in res["export"]["bytes"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32", help="model name(s), comma separated")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/step")
    ap.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    ap.add_argument("--bundle", help=argparse.SUPPRESS)
    ap.add_argument("--only", default=",".join(WORKERS), help="comma list of trainers to run")
    ap.add_argument("--work", help="keep the exported bundle here and reuse it on the next run")
    args = ap.parse_args()
    if args.worker:
        res = worker(
            args.worker, Path(args.bundle), args.model, args.batch, args.threads, args.steps, args.warmup
        )
        print(json.dumps(res))
        return
    results = [_run_model(model, args) for model in args.model.split(",")]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, sort_keys=True))
    out.with_suffix(".md").write_text("\n".join(_markdown(r) for r in results))
    print("\n".join(_markdown(r) for r in results))


def _export_once(model: str, work: Path) -> dict:
    # Export dominates a ViT-B run; --work keeps it so trainer runs can be repeated on a quiet machine.
    record = work / "export.json"
    if record.exists():
        return json.loads(record.read_text())
    exported = export(model, work)
    record.write_text(json.dumps(exported, indent=2))
    return exported


def _run_model(model: str, args) -> dict:
    keep = args.work is not None
    work = Path(args.work) / model if keep else Path(tempfile.mkdtemp(prefix="bench-step-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        exported = _export_once(model, work)
        trainers = []
        for kind in args.only.split(","):
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                kind,
                "--bundle",
                exported["bundle"],
                "--model",
                model,
            ]
            cmd += ["--batch", str(args.batch), "--threads", str(args.threads), "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                trainers.append({"kind": kind, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]})
            else:
                trainers.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(json.dumps(trainers[-1]), flush=True)
        return {
            "args": vars(args) | {"worker": None, "model": model},
            "platform": f"{platform.machine()} Python {platform.python_version()}",
            "export": exported,
            "trainers": trainers,
        }
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
