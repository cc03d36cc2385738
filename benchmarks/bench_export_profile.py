"""Issue 16: where an export's time and memory go, phase by phase, and what the export cache saves.

Per adapter, each in a fresh process (2 threads, random-init weights, classify, 10 labels):
  ort         `--format ort-training` (the baseline the step export is held to: <= 2x)
  step-miss   `--format step` into an empty export cache: every graph traced
  step-hit    `--format step`, other seed (weights) and other labels of the same count: graphs
              from the cache, weights filled in
  both-hit    `--format both` (what `fedclip-coord export` writes), cache warm, other seed again
Each export records its phases (exporters/phases.py): wall seconds and the process's peak RSS
inside the phase.

    python benchmarks/bench_export_profile.py --model fedclip-tiny            # ~10 min on 2 busy cores
    python benchmarks/bench_export_profile.py --model ViT-B-32 --adapters lora
    python benchmarks/bench_export_profile.py --repeats 3   # ort and step-miss 3 times each
    python benchmarks/bench_export.py --profile ...                            # the same

Writes benchmarks/results/export_profile.json and .md (or --out-name NAME.*).
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

LABELS = tuple(f"class{i}" for i in range(10))
OTHER_LABELS = tuple(f"kind{i}" for i in range(10))  # same count, same prompt length in tokens


def work_export(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    from fedclip.exporters.bundle import export_bundle
    from fedclip.exporters.config import ExportConfig
    from fedclip.exporters.export_cache import ExportCache
    from fedclip.exporters.phases import Phases

    cache = ExportCache(spec["cache"]) if spec.get("cache") else None
    phases = Phases()
    cfg = ExportConfig(
        model=spec["model"],
        out=spec["out"],
        adapter=spec["adapter"],
        targets=tuple(spec["targets"]),
        labels=tuple(spec["labels"]),
        seed=spec["seed"],
        format=spec["format"],
    )
    start, cpu = time.perf_counter(), _cpu()
    export_bundle(cfg, cache=cache, phases=phases)
    seconds, cpu_seconds = time.perf_counter() - start, _cpu() - cpu
    size = sum(p.stat().st_size for p in Path(spec["out"]).rglob("*") if p.is_file())
    return {
        "export_s": round(seconds, 2),
        "export_cpu_s": round(cpu_seconds, 2),
        "phases": phases.summary(),
        "cache": {"hits": cache.hits, "misses": cache.misses} if cache else None,
        "bundle_bytes": size,
    }


def _cpu() -> float:
    """CPU seconds of this process and of the children it waited for (the forked tracer)."""
    import os

    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


VARIANTS = (
    # name, format, seed, labels, cache
    ("ort", "ort-training", 0, LABELS, False),
    ("step-miss", "step", 0, LABELS, True),
    ("step-hit", "step", 1, OTHER_LABELS, True),
    ("both-hit", "both", 2, OTHER_LABELS, True),
)


def _export_child(args: argparse.Namespace, spec: dict) -> dict:
    load = M.loadavg()
    res = M.run_child(
        [sys.executable, __file__, "--worker", "--spec", json.dumps(spec)],
        timeout=args.timeout,
        env=M.thread_env(args.threads),
    ).check()
    res["load_before"] = load
    res["peak_rss_mb"] = res["child_peak_rss_mb"]
    shutil.rmtree(spec["out"], ignore_errors=True)
    return res


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fedclip-export-profile-"))
    report: dict[str, Any] = {
        "issue": 16,
        "model": args.model,
        "targets": args.targets,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": M.machine(),
        "started": M.utc_now(),
        "load_start": M.loadavg(),
        "runs": {},
    }
    try:
        for adapter in args.adapters:
            runs: dict[str, Any] = {"repeats": []}
            for rep in range(args.repeats):
                # ort and a traced step export back to back (order alternating), each step export
                # into an empty cache; the cached variants once, after the first.
                cache = work / f"cache-{adapter}-{rep}"
                names = [v for v in VARIANTS if rep == 0 or v[0] in ("ort", "step-miss")]
                if rep % 2:
                    names = [names[1], names[0], *names[2:]]
                pair: dict[str, Any] = {}
                for name, fmt, seed, labels, cached in names:
                    spec = {
                        "model": args.model,
                        "adapter": adapter,
                        "targets": args.targets,
                        "labels": list(labels),
                        "seed": seed,
                        "format": fmt,
                        "threads": args.threads,
                        "out": str(work / f"{adapter}-{name}-{rep}"),
                        "cache": str(cache) if cached else None,
                    }
                    res = _export_child(args, spec)
                    runs[name] = res  # the phase tables show the last run of each variant
                    pair[name] = {k: res[k] for k in ("export_s", "export_cpu_s", "load_before")}
                    print(
                        f"  {adapter:<9} {name:<10} #{rep + 1} {res['export_s']:8.1f} s "
                        f"({res['export_cpu_s']:.1f} s CPU)  peak {res['peak_rss_mb']:.0f} MiB"
                    )
                runs["repeats"].append(pair)
            report["runs"][adapter] = runs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_end"] = M.loadavg()
    report["finished"] = M.utc_now()
    return report


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def traced_ratios(runs: dict) -> dict:
    """step-miss / ort per repeat (wall and CPU) and their medians."""
    reps = runs.get("repeats") or [{k: runs[k] for k in ("ort", "step-miss")}]
    wall = [r["step-miss"]["export_s"] / r["ort"]["export_s"] for r in reps]
    cpu = [
        r["step-miss"]["export_cpu_s"] / r["ort"]["export_cpu_s"]
        for r in reps
        if r["ort"].get("export_cpu_s") and r["step-miss"].get("export_cpu_s")
    ]
    return {
        "ort_s": _median([r["ort"]["export_s"] for r in reps]),
        "step_s": _median([r["step-miss"]["export_s"] for r in reps]),
        "wall": wall,
        "cpu": cpu,
        "wall_median": _median(wall),
        "cpu_median": _median(cpu) if cpu else None,
    }


def _peak(res: dict) -> float:
    """The export's peak RSS: each phase resets the process's peak to its start (phases.py), so the
    process's peak at the end covers the last phases only; the largest of it and every phase's."""
    parent = [p["peak_rss_mb"] for p in res.get("phases", []) if p.get("peak_rss_mb") and not p.get("forked")]
    return max([res["peak_rss_mb"], *parent])


def _tracer(res: dict) -> str:
    """The forked tracer's peak RSS (pages it shares with the export included), if it forked."""
    peaks = [p["peak_rss_mb"] for p in res.get("phases", []) if p.get("forked") and p.get("peak_rss_mb")]
    return f", forked tracer {max(peaks):.0f} MiB" if peaks else ""


def _phase_rows(res: dict) -> list[list[Any]]:
    rows = []
    for p in res["phases"]:
        name = ("&nbsp;&nbsp;" * p["depth"]) + p["name"] + (" (forked)" if p.get("forked") else "")
        rows.append([name, p["seconds"], p.get("cpu_seconds", ""), p["peak_rss_mb"]])
    return rows


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Export profile: {r['model']}, targets {','.join(r['targets'])}, {r['threads']} threads, CPU",
        "",
        f"{m['cpu_model']}, {m['nproc']} cores; load average {r['load_start']} at the start, "
        f"{r['load_end']} at the end (a shared machine: absolute seconds vary with load, ratios less).",
        "Random-init weights; classify with 10 labels; each export in a fresh process; the times are the",
        "`export_bundle` call (the process's imports, ~5-15 s, excluded); peak RSS is the process's.",
        "",
        "## Summary",
        "",
    ]
    n = r.get("repeats", 1)
    lines += [
        f"Traced step export against the ORT-artifact export, {n} repeat(s) each, back to back, the order",
        "alternating; the ratio is the median of the per-repeat ratios (target <= 2x), by wall time and",
        "by the process's CPU time (less distorted by other jobs on a shared machine). Where the export",
        "traces the step graphs in a forked child (exporters/background.py), CPU counts both processes,",
        "the phases list the child's (under 'tracing the step graphs', which overlaps the others; their",
        "peak RSS is the child's, pages it shares with the export included), peak RSS is the export's.",
        "",
    ]
    rows = []
    for adapter, runs in r["runs"].items():
        t = traced_ratios(runs)
        hit, both = (runs[k]["export_s"] for k in ("step-hit", "both-hit"))
        peaks = [_peak(v) for k, v in runs.items() if k != "repeats"]
        rows.append(
            [
                adapter,
                round(t["ort_s"], 2),
                round(t["step_s"], 2),
                f"{t['wall_median']:.2f}x",
                " ".join(f"{x:.2f}" for x in t["wall"]),
                f"{t['cpu_median']:.2f}x" if t["cpu_median"] is not None else "",
                hit,
                f"{M.ratio(hit, t['ort_s']):.2f}x",
                both,
                max(peaks),
            ]
        )
    lines.append(
        M.md_table(
            [
                "adapter",
                "ort-training s",
                "step, traced s",
                "step/ort (wall)",
                "per repeat",
                "step/ort (CPU)",
                "step, cached s",
                "cached/ort",
                "both, cached s",
                "peak RSS MiB",
            ],
            rows,
        )
    )
    for adapter, runs in r["runs"].items():
        for name in ("step-miss", "step-hit", "ort"):
            res = runs[name]
            lines += [
                "",
                f"## {adapter}: {name} ({res['export_s']} s, "
                f"{res.get('export_cpu_s', '?')} s CPU, peak {_peak(res):.0f} MiB{_tracer(res)})",
                "",
                M.md_table(["phase", "seconds", "CPU s", "peak RSS MiB"], _phase_rows(res)),
            ]
    for note in r.get("notes", []):
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="fedclip-tiny")
    p.add_argument("--adapters", default="lora,tri-lora", type=lambda s: s.split(","))
    p.add_argument("--targets", default="q,v,o,mlp", type=lambda s: s.split(","))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="ort and traced step exports per adapter")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per child")
    p.add_argument("--out-name", default="export_profile")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--report-only", action="store_true", help="re-render the .md from the .json")
    p.add_argument("--note", action="append", default=[], help="a remark for the report (repeatable)")
    args = p.parse_args(argv)
    if args.worker:
        M.emit(work_export(json.loads(args.spec)))
        return
    path = M.RESULTS / f"{args.out_name}.json"
    if args.report_only:
        report = json.loads(path.read_text())
        report["notes"] = report.get("notes", []) + args.note
    else:
        report = run(args)
        report["notes"] = args.note
    M.write_json(path, report)
    (M.RESULTS / f"{args.out_name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
