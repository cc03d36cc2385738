"""Issue 3: the device agent's memory and time, `fedclip-agent train` vs the same LoRA in PyTorch.

On a real image folder of Fashion-MNIST PNGs (decoded and preprocessed every step by both sides,
with the same `fedclip.sdk.data` pipeline and the same shuffle order), each run a fresh process:
  agent   `fedclip-agent train --bundle B --data D --json --threads T` as a real subprocess; peak RSS
          from os.wait4; step time from two runs (--max-steps W and W+S): (t_long - t_short) / S,
          so ONNX Runtime's warm-up steps are not counted
  torch   the exporter's PyTorch twin of the same bundle, AdamW on the adapter only, same batches
For a text-tower-only bundle, the agent trains from its on-disk embedding cache (cold: the run that
builds it, warm: a later run), and PyTorch runs both without a cache (frozen image tower under
no_grad every step) and with one (embeddings computed once, in memory).

    python benchmarks/bench_agent.py                         # fedclip-tiny (the agent's target size)
    python benchmarks/bench_agent.py --model ViT-B-32 --images 96 --batch-size 8 --steps 6 --warmup 2
    python benchmarks/bench_agent.py --bundles DIR           # reuse DIR/bundle-lora, DIR/bundle-lora-text

Writes benchmarks/results/agent.json and agent.md (or --out-name NAME.*).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _measure as M  # noqa: E402

LR = 1e-4
EXPORT_SCRIPT = HERE / "bench_export.py"


# ---- worker: the same training in PyTorch -------------------------------------------------------
def work_torch(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    from fedclip.exporters.bundle import torch_twin
    from fedclip.sdk.data import Dataset
    from fedclip.sdk.manifest import Manifest
    from fedclip.sdk.preprocess import ImageTransform

    rss0 = M.rss_mb()
    manifest = Manifest.load(spec["bundle"])
    twin = torch_twin(manifest, model=spec["model"])
    graph, encoder = twin.graph, twin.image_encoder
    params = [p for p in graph.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR)
    dataset = Dataset.open(spec["data"], labels=manifest.task.labels)
    transform = ImageTransform(manifest.preprocess)
    bs = spec["batch_size"]

    cache_s, cached = None, None
    if encoder is not None and spec["cache"]:
        # The in-memory analogue of the agent's cache: every image through the frozen tower once.
        t0 = time.perf_counter()
        cached = {}
        with torch.no_grad():
            for b in dataset.batches(transform, 64):
                emb = encoder(torch.from_numpy(b.images))
                for s, e in zip(b.samples, emb, strict=True):
                    cached[s.key] = e
        cache_s = time.perf_counter() - t0
    rss_ready = M.rss_mb()

    def batches(epoch: int):
        if cached is None:
            for b in dataset.batches(transform, bs, shuffle=True, seed=epoch):
                yield torch.from_numpy(b.images), torch.from_numpy(b.labels)
            return
        order = dataset.order(True, epoch)
        for i in range(0, len(order), bs):
            samples = [dataset.samples[j] for j in order[i : i + bs]]
            yield (
                torch.stack([cached[s.key] for s in samples]),
                torch.tensor([s.label for s in samples], dtype=torch.long),
            )

    graph.train()
    times, losses = [], []
    epoch = 0
    while len(times) < spec["max_steps"]:
        it = batches(epoch)
        while len(times) < spec["max_steps"]:
            t0 = time.perf_counter()
            try:
                x, y = next(it)
            except StopIteration:
                break
            if encoder is not None and cached is None:
                with torch.no_grad():
                    x = encoder(x)
            loss, _ = graph(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            times.append(time.perf_counter() - t0)
        epoch += 1
    steady = times[spec["warmup"] :]
    return {
        "steps": len(times),
        "train_seconds": sum(times),
        "step_s_steady": sum(steady) / len(steady),
        "step_s_all": sum(times) / len(times),
        "step_times_s": [round(t, 5) for t in times],
        "cache_s": cache_s,
        "rss_imports_mb": rss0,
        "rss_ready_mb": rss_ready,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "trainable_params": sum(p.numel() for p in params),
    }


def work_baseline(spec: dict) -> dict:
    """RSS of the imports alone: what each side pays before any model is loaded."""
    if spec["side"] == "torch":
        import open_clip  # noqa: F401
        import torch  # noqa: F401

        from fedclip.exporters import bundle  # noqa: F401
    else:
        from fedclip.device_agent import batches, local_cmd, loops, statistics, trainer  # noqa: F401
        from fedclip.device_agent.ort_loader import training_api

        training_api()
    return {"rss_mb": M.rss_mb(), "torch_imported": "torch" in sys.modules}


def work_prepare(spec: dict) -> dict:
    """The PNG folder (a worker: the parent stays lean, see _measure's module doc)."""
    from fedclip.sdk.data import label_folder_name
    from fedclip.sdk.manifest import Manifest
    from fedclip.sdk.partition import load_fashion_mnist

    labels = Manifest.load(spec["bundle"], verify=False).task.labels
    folder = Path(spec["folder"])
    data = load_fashion_mnist()
    start = 60_000  # the official test split
    for i in range(start, start + spec["images"]):
        d = folder / label_folder_name(labels[int(data.labels[i])])
        d.mkdir(parents=True, exist_ok=True)
        data.image(i).save(d / f"{i:06d}.png")
    return {"folder": str(folder), "labels": list(labels)}


WORKERS = {"torch": work_torch, "baseline": work_baseline, "prepare": work_prepare}


# ---- parent --------------------------------------------------------------------------------------
def _py_child(script: Path, name: str, spec: dict, args: argparse.Namespace) -> dict:
    run = M.run_child(
        [sys.executable, script, "--worker", name, "--spec", json.dumps(spec)],
        timeout=args.timeout,
        env=M.thread_env(args.threads),
    )
    result = run.check()
    result["peak_rss_mb"] = result["child_peak_rss_mb"]  # see bench_export.child
    result["tree_peak_rss_mb"] = run.peak_rss_mb
    result["parent_rss_mb"] = run.parent_rss_mb
    result["wall_s"] = run.wall_s
    return result


def agent_run(bundle: Path, data: Path, cache: Path, max_steps: int, args: argparse.Namespace) -> dict:
    exe = Path(sys.executable).with_name("fedclip-agent")
    argv = [
        exe if exe.exists() else "fedclip-agent",
        "train",
        "--bundle", bundle,
        "--data", data,
        "--epochs", str(args.epochs),
        "--batch-size", str(args.batch_size),
        "--lr", str(LR),
        "--max-steps", str(max_steps),
        "--threads", str(args.threads),
        "--cache-dir", cache,
        "--json",
        "--quiet",
    ]  # fmt: skip
    run = M.run_child(argv, timeout=args.timeout, env=M.thread_env(args.threads))
    if run.rc != 0:
        raise RuntimeError(f"fedclip-agent train failed (rc {run.rc}):\n{run.stderr_tail}")
    metrics = json.loads(run.stdout.strip().splitlines()[-1])
    return {
        "peak_rss_mb": run.peak_rss_mb,
        "parent_rss_mb": run.parent_rss_mb,
        "wall_s": run.wall_s,
        "train_seconds": metrics["train_seconds"],
        "steps": int(metrics["train_steps"]),
        "loss_first": metrics["train_loss_first"],
        "loss_last": metrics["train_loss_last"],
    }


def agent_pair(bundle: Path, data: Path, cache: Path, args: argparse.Namespace) -> dict:
    """A short and a long run; the difference gives the steady per-step time."""
    short = agent_run(bundle, data, cache, args.warmup, args)
    long = agent_run(bundle, data, cache, args.warmup + args.steps, args)
    steady = (long["train_seconds"] - short["train_seconds"]) / (long["steps"] - short["steps"])
    out = dict(long, step_s_steady=steady, step_s_all=long["train_seconds"] / long["steps"])
    out["short_run"] = short
    out["peak_rss_mb"] = max(short["peak_rss_mb"], long["peak_rss_mb"])
    return out


def export(out: Path, towers: list[str], args: argparse.Namespace) -> dict:
    spec = {
        "model": args.model,
        "adapter": "lora",
        "rank": args.rank,
        "alpha": args.alpha,
        "targets": ["q", "v"],
        "towers": towers,
        "labels": "fashion-mnist",
        "threads": args.threads,
        "out": str(out),
    }
    return _py_child(EXPORT_SCRIPT, "export", spec, args)


def log(msg: str) -> None:
    print(msg, flush=True)


def measure(args: argparse.Namespace, bundles: dict[str, Path], data: Path, cache: Path) -> dict[str, dict]:
    """Every agent / PyTorch run at `args.threads` threads; `cache` is a fresh embedding-cache dir."""
    max_steps = args.warmup + args.steps
    tspec = {
        "model": args.model,
        "data": str(data),
        "batch_size": args.batch_size,
        "threads": args.threads,
        "warmup": args.warmup,
        "max_steps": max_steps,
    }
    rows: dict[str, dict] = {}

    def record(key: str, result: dict) -> None:
        rows[key] = result
        log(
            f"  {key:<26} peak RSS {result['peak_rss_mb']:8.1f} MiB"
            f"  steady step {result['step_s_steady']:.4f} s  wall {result['wall_s']:.1f} s"
        )

    log("[lora: vision + text towers]")
    record("agent_lora", agent_pair(bundles["lora"], data, cache.with_name(cache.name + "-unused"), args))
    record(
        "torch_lora",
        _py_child(
            HERE / "bench_agent.py", "torch", dict(tspec, bundle=str(bundles["lora"]), cache=False), args
        ),
    )
    log("[lora: text tower only]")
    record(
        "agent_text_cold_cache",
        agent_run(bundles["lora-text"], data, cache, max_steps, args) | {"step_s_steady": float("nan")},
    )
    record("agent_text_warm_cache", agent_pair(bundles["lora-text"], data, cache, args))
    text = dict(tspec, bundle=str(bundles["lora-text"]))
    record("torch_text_no_cache", _py_child(HERE / "bench_agent.py", "torch", dict(text, cache=False), args))
    record(
        "torch_text_memory_cache", _py_child(HERE / "bench_agent.py", "torch", dict(text, cache=True), args)
    )
    return rows


def run(args: argparse.Namespace) -> dict:
    work = Path(args.work or tempfile.mkdtemp(prefix="fedclip-bench-agent-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "benchmark": "agent (issue 3)",
        "started_utc": M.utc_now(),
        "loadavg_start": M.loadavg(),
        "machine": M.machine(),
        "config": {
            k: getattr(args, k)
            for k in (
                "model",
                "images",
                "batch_size",
                "epochs",
                "steps",
                "warmup",
                "threads",
                "rank",
                "alpha",
            )
        }
        | {"lr": LR, "targets": ["q", "v"]},
    }
    bundles = {}
    for key, towers in (("lora", ["vision", "text"]), ("lora-text", ["text"])):
        path = Path(args.bundles) / f"bundle-{key}" if args.bundles else work / f"bundle-{key}"
        if not args.bundles:
            log(f"[export] {key}")
            export(path, towers, args)
        bundles[key] = path
    prep = {"bundle": str(bundles["lora"]), "folder": str(work / "images"), "images": args.images}
    data = Path(_py_child(HERE / "bench_agent.py", "prepare", prep, args)["folder"])
    log(f"[{args.threads} threads]")
    report["runs"] = measure(args, bundles, data, work / f"cache-{args.threads}")
    if args.control_threads and args.control_threads != args.threads:
        # Control: torch's OpenMP team stalls when the shared machine deschedules one of its threads.
        ctl = argparse.Namespace(**{**vars(args), "threads": args.control_threads})
        log(f"[control: {ctl.threads} thread(s)]")
        report["control"] = {"threads": ctl.threads, "runs": measure(ctl, bundles, data, work / "cache-ctl")}
    report["baselines"] = {
        side: _py_child(HERE / "bench_agent.py", "baseline", {"side": side}, args)
        for side in ("agent", "torch")
    }
    report["loadavg_end"] = M.loadavg()
    report["finished_utc"] = M.utc_now()
    report["summary"] = summarize(report)
    if args.keep:
        report["work_dir"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return report


def summarize(r: dict) -> dict:
    x = r["runs"]

    def pair(agent: str, torch: str) -> dict:
        a, t = x[agent], x[torch]
        return {
            "agent": agent,
            "torch": torch,
            "peak_rss_agent_over_torch": M.ratio(a["peak_rss_mb"], t["peak_rss_mb"]),
            "step_agent_over_torch": M.ratio(a["step_s_steady"], t["step_s_steady"]),
        }

    out = {
        "lora": pair("agent_lora", "torch_lora"),
        "text_vs_torch_no_cache": pair("agent_text_warm_cache", "torch_text_no_cache"),
        "text_vs_torch_memory_cache": pair("agent_text_warm_cache", "torch_text_memory_cache"),
        "text_cache_speedup_agent_vs_agent_lora": M.ratio(
            x["agent_lora"]["step_s_steady"], x["agent_text_warm_cache"]["step_s_steady"]
        ),
    }
    if "control" in r:
        out["control"] = summarize({"runs": r["control"]["runs"]})
    return out


NAMES = {
    "agent_lora": "agent, LoRA vision+text",
    "torch_lora": "PyTorch, LoRA vision+text",
    "agent_text_cold_cache": "agent, LoRA text only, cold cache (builds it)",
    "agent_text_warm_cache": "agent, LoRA text only, warm cache",
    "torch_text_no_cache": "PyTorch, LoRA text only, image tower every step",
    "torch_text_memory_cache": "PyTorch, LoRA text only, embeddings cached in memory",
}


def _tables(x: dict, s: dict) -> list[str]:
    rows = []
    for key, label in NAMES.items():
        v = x[key]
        mean_all = v["step_s_all"] if "step_s_all" in v else v["train_seconds"] / v["steps"]
        steady = v["step_s_steady"] if v["step_s_steady"] == v["step_s_steady"] else "n/a"  # nan: one run
        rows.append([label, v["peak_rss_mb"], steady, mean_all, v["steps"], v["wall_s"]])
    header = ["run", "peak RSS (MiB)", "steady step (s)", "mean step incl. warm-up (s)", "steps", "wall (s)"]
    pairs = (s["lora"], s["text_vs_torch_no_cache"], s["text_vs_torch_memory_cache"])
    return [
        M.md_table(header, rows),
        "",
        M.md_table(
            ["comparison", "peak RSS agent/torch", "step time agent/torch"],
            [
                [f"{NAMES[p['agent']]} vs {NAMES[p['torch']]}", p["peak_rss_agent_over_torch"],
                 p["step_agent_over_torch"]]
                for p in pairs
            ],
        ),
        "",
        f"Text-tower-only with the warm cache is {s['text_cache_speedup_agent_vs_agent_lora']:.1f}x faster "
        "per step than the agent's vision+text LoRA. The cold-cache run's wall time includes embedding "
        "every image once: "
        f"{x['agent_text_cold_cache']['wall_s'] - x['agent_text_warm_cache']['wall_s']:.1f} s more than the "
        "same run with a warm cache"
        + (
            " (PyTorch's in-memory cache of the same images took "
            f"{x['torch_text_memory_cache']['cache_s']:.2f} s)."
            if x["torch_text_memory_cache"].get("cache_s") is not None
            else "."
        ),
        "",
    ]  # fmt: skip


def _findings(r: dict) -> list[str]:
    """What the numbers say; every figure comes from the report."""
    x, s, base = r["runs"], r["summary"], r["baselines"]
    lo = s["lora"]
    out = [
        "## Reading the numbers",
        "",
        f"- Memory: the agent's peak RSS is {lo['peak_rss_agent_over_torch']:.2f}x PyTorch's for the same "
        f"LoRA training ({x['agent_lora']['peak_rss_mb']:.0f} vs {x['torch_lora']['peak_rss_mb']:.0f} MiB). "
        f"For a model this size the process's fixed cost dominates: the agent's imports take "
        f"{base['agent']['rss_mb']:.0f} MiB without torch, torch + open_clip "
        f"{base['torch']['rss_mb']:.0f} MiB before any model is built.",
    ]
    timing = [("2 threads", s)]
    if "control" in r:
        timing.append((f"{r['control']['threads']} thread(s)", s["control"]))
    parts = [
        f"{label}: vision+text {t['lora']['step_agent_over_torch']:.2f}x, text-only (warm cache) vs PyTorch "
        f"recomputing the image tower {t['text_vs_torch_no_cache']['step_agent_over_torch']:.2f}x, vs "
        f"PyTorch with cached embeddings {t['text_vs_torch_memory_cache']['step_agent_over_torch']:.2f}x"
        for label, t in timing
    ]
    out.append("- Step time, agent / PyTorch (below 1: the agent is faster): " + "; ".join(parts) + ".")
    if "control" in r:
        ctl = s["control"]["lora"]["step_agent_over_torch"]
        out.append(
            "  The 2-thread PyTorch times are inflated by the loaded machine (see the control section); "
            + (
                f"at {r['control']['threads']} thread(s) the agent's vision+text step is "
                f"{(ctl - 1) * 100:.0f}% slower than PyTorch's on this small graph (not profiled; with "
                "so little compute per node, per-node overhead is the likely cause), while its text-only "
                "steps from the cache stay faster."
                if ctl > 1
                else f"at {r['control']['threads']} thread(s) the agent is still faster or even."
            )
        )
    out.append(
        f"- The embedding cache: with a text-tower-only adapter the agent's step is "
        f"{s['text_cache_speedup_agent_vs_agent_lora']:.1f}x faster than with adapters on both towers, "
        "and the cache is built once per bundle and image content (the cold-cache run)."
    )
    for model, extra in r.get("other_models", {}).items():
        ex, es = extra["runs"], extra["summary"]
        lo, tc = es["lora"], es["text_vs_torch_memory_cache"]
        warm = ex["agent_text_warm_cache"]["peak_rss_mb"]
        out.append(
            f"- {model}: agent / PyTorch peak RSS {lo['peak_rss_agent_over_torch']:.2f}x and step "
            f"time {lo['step_agent_over_torch']:.2f}x for vision+text LoRA; text-only with a warm "
            f"cache {tc['peak_rss_agent_over_torch']:.2f}x memory and {tc['step_agent_over_torch']:.2f}x "
            f"time of PyTorch with cached embeddings. The warm-cache agent still peaks at {warm:.0f} MiB "
            "although it trains only the text tower: `batch_source` builds a `Predictor` for the "
            "cache, and `Predictor.__init__` opens the full inference graph (both towers) even when "
            "every embedding is already cached and nothing is ever run through it."
        )
    return out + [""]


def markdown(r: dict) -> str:
    m, cfg, base = r["machine"], r["config"], r["baselines"]
    lines = [
        f"# Agent benchmark: `fedclip-agent train` vs PyTorch ({cfg['model']}, random init, CPU)",
        "",
        f"Run {r['started_utc']} to {r['finished_utc']} on {m['nproc']} x {m['cpu_model']}, "
        f"{m['mem_total_gb']} GB RAM; load average (1/5/15 min) {r['loadavg_start']} at start, "
        f"{r['loadavg_end']} at end. **The machine was shared with other jobs running tests** (load well "
        "above the 2 cores), so absolute times are inflated and noisy; runs went back to back.",
        "",
        "Versions: " + ", ".join(f"{k} {val}" for k, val in m["versions"].items()) + ".",
        "",
        *[f"Note: {n}\n" for n in r.get("notes", [])],
        f"Data: {cfg['images']} Fashion-MNIST test images as PNG files in an image folder (10 labels), "
        f"decoded and preprocessed every step on both sides; batch {cfg['batch_size']}, LoRA rank "
        f"{cfg['rank']} alpha {cfg['alpha']} on q,v, AdamW lr {cfg['lr']}. "
        f"Steady step = mean over steps {cfg['warmup'] + 1}..{cfg['warmup'] + cfg['steps']} (agent: from two "
        f"CLI runs with --max-steps {cfg['warmup']} and {cfg['warmup'] + cfg['steps']}; PyTorch: per-step "
        "timers). Peak RSS: the agent CLI's ru_maxrss (os.wait4); PyTorch workers' own ru_maxrss; the "
        "parent that spawns them stays at ~20 MiB (Linux keeps the RSS high-water mark across exec).",
        "",
        f"Import baselines (RSS after imports only): agent side {base['agent']['rss_mb']:.0f} MiB "
        f"(torch imported: {base['agent']['torch_imported']}), PyTorch side (torch + open_clip + exporter) "
        f"{base['torch']['rss_mb']:.0f} MiB.",
        "",
        *_findings(r),
        f"## {cfg['threads']} threads (both sides)",
        "",
        *_tables(r["runs"], r["summary"]),
    ]
    if "control" in r:
        n = r["control"]["threads"]
        lines += [
            f"## Control: {n} thread{'s' if n > 1 else ''} (both sides)",
            "",
            "PyTorch's OpenMP thread team waits at every parallel region for all its threads; on a machine "
            "whose load is several times its core count one of them is often descheduled, which inflates "
            "PyTorch's multi-threaded step times far more than ONNX Runtime's. The single-thread runs do "
            "not have that handicap, so they are the fairer speed comparison here.",
            "",
            *_tables(r["control"]["runs"], r["summary"]["control"]),
        ]
    for model, extra in r.get("other_models", {}).items():
        c = extra["config"]
        lines += [
            f"## {model}, {c['threads']} threads",
            "",
            f"Run {extra['started_utc']} to {extra['finished_utc']}, load average "
            f"{extra['loadavg_start']} at start, {extra['loadavg_end']} at end; {c['images']} images, "
            f"batch {c['batch_size']}, steady step = mean over steps "
            f"{c['warmup'] + 1}..{c['warmup'] + c['steps']}.",
            "",
            *_tables(extra["runs"], extra["summary"]),
        ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fedclip-tiny")
    p.add_argument("--images", type=int, default=512, help="PNG images in the training folder")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=5, help="passed to the agent; --max-steps stops earlier")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps not counted")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--control-threads", type=int, default=1, help="repeat every run at this many threads (0: skip)"
    )
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--bundles", default=None, help="reuse DIR/bundle-lora and DIR/bundle-lora-text")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--work", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out-name", default="agent")
    p.add_argument("--report-only", action="store_true", help="re-render the .md from the .json")
    p.add_argument("--note", action="append", default=[], help="a remark for the report (repeatable)")
    p.add_argument(
        "--merge-into",
        default=None,
        help="add this run to report NAME (results/NAME.json) as an extra model section",
    )
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.report_only:
        report = json.loads((M.RESULTS / f"{args.out_name}.json").read_text())
        report["summary"] = summarize(report)
        for extra in report.get("other_models", {}).values():
            extra["summary"] = summarize(extra)
        if args.note:
            report["notes"] = report.get("notes", []) + args.note
            M.write_json(M.RESULTS / f"{args.out_name}.json", report)
        (M.RESULTS / f"{args.out_name}.md").write_text(markdown(report))
        return
    if args.worker:
        M.emit(WORKERS[args.worker](json.loads(args.spec)))
        return
    report = run(args)
    if args.merge_into:
        extra = report
        report = json.loads((M.RESULTS / f"{args.merge_into}.json").read_text())
        report.setdefault("other_models", {})[args.model] = extra
        args.out_name = args.merge_into
    M.write_json(M.RESULTS / f"{args.out_name}.json", report)
    (M.RESULTS / f"{args.out_name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
