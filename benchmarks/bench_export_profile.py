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
    start = time.perf_counter()
    export_bundle(cfg, cache=cache, phases=phases)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in Path(spec["out"]).rglob("*") if p.is_file())
    return {
        "export_s": round(seconds, 2),
        "phases": phases.summary(),
        "cache": {"hits": cache.hits, "misses": cache.misses} if cache else None,
        "bundle_bytes": size,
    }


VARIANTS = (
    # name, format, seed, labels, cache
    ("ort", "ort-training", 0, LABELS, False),
    ("step-miss", "step", 0, LABELS, True),
    ("step-hit", "step", 1, OTHER_LABELS, True),
    ("both-hit", "both", 2, OTHER_LABELS, True),
)


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="fedclip-export-profile-"))
    report: dict[str, Any] = {
        "issue": 16,
        "model": args.model,
        "targets": args.targets,
        "threads": args.threads,
        "machine": M.machine(),
        "started": M.utc_now(),
        "load_start": M.loadavg(),
        "runs": {},
    }
    try:
        for adapter in args.adapters:
            cache = work / f"cache-{adapter}"
            runs = {}
            for name, fmt, seed, labels, cached in VARIANTS:
                spec = {
                    "model": args.model,
                    "adapter": adapter,
                    "targets": args.targets,
                    "labels": list(labels),
                    "seed": seed,
                    "format": fmt,
                    "threads": args.threads,
                    "out": str(work / f"{adapter}-{name}"),
                    "cache": str(cache) if cached else None,
                }
                load = M.loadavg()
                res = M.run_child(
                    [sys.executable, __file__, "--worker", "--spec", json.dumps(spec)],
                    timeout=args.timeout,
                    env=M.thread_env(args.threads),
                ).check()
                res["load_before"] = load
                res["peak_rss_mb"] = res["child_peak_rss_mb"]
                runs[name] = res
                print(
                    f"  {adapter:<9} {name:<10} {res['export_s']:8.1f} s  peak {res['peak_rss_mb']:.0f} MiB"
                )
                shutil.rmtree(spec["out"], ignore_errors=True)
            report["runs"][adapter] = runs
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["load_end"] = M.loadavg()
    report["finished"] = M.utc_now()
    return report


def _phase_rows(res: dict) -> list[list[Any]]:
    rows = []
    for p in res["phases"]:
        rows.append([("&nbsp;&nbsp;" * p["depth"]) + p["name"], p["seconds"], p["peak_rss_mb"]])
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
    rows = []
    for adapter, runs in r["runs"].items():
        ort, miss, hit, both = (runs[k]["export_s"] for k in ("ort", "step-miss", "step-hit", "both-hit"))
        rows.append(
            [
                adapter,
                ort,
                miss,
                f"{M.ratio(miss, ort):.1f}x",
                hit,
                f"{M.ratio(hit, ort):.2f}x",
                both,
                max(v["peak_rss_mb"] for v in runs.values()),
            ]
        )
    lines.append(
        M.md_table(
            [
                "adapter",
                "ort-training s",
                "step, traced s",
                "step/ort",
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
                f"## {adapter}: {name} ({res['export_s']} s, peak {res['peak_rss_mb']:.0f} MiB)",
                "",
                M.md_table(["phase", "seconds", "peak RSS MiB"], _phase_rows(res)),
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
