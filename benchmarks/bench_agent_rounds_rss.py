"""A running agent's memory over rounds: `fedclip-agent start` processes of a real demo, sampled.

    python benchmarks/bench_agent_rounds_rss.py --out benchmarks/results/agent_rounds_rss

Runs `fedclip-coord demo` (the embedded broker, `fedclip-coord serve`, one `fedclip-agent start`
process per agent, the ORT training backend where onnxruntime-training is installed, as `auto`
picks) and samples every agent process's RSS every 0.5 s; the peak per agent is reported. Two
variants, alternated `--repeats` times in one run:
- `as built`: the agent as it is (`device_agent.heap` fixes glibc's mmap threshold when the ORT
  trainer opens);
- `heap fix off`: the same with `fix_mmap_threshold` replaced by a no-op (a `sitecustomize` on the
  agents' PYTHONPATH), what agents did before: each round's optimizer reset reopened ORT's training
  stack and the freed stacks fragmented the heap.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _measure import loadavg, machine, md_table, utc_now, write_json  # noqa: E402

VARIANTS = ("as built", "heap fix off")
_NO_FIX = "import fedclip.device_agent.heap as h\nh.fix_mmap_threshold = lambda: False\n"


def run_demo(args: argparse.Namespace, variant: str, out: Path) -> list[float]:
    """Peak RSS (MiB) of each agent process of one demo run."""
    env = dict(os.environ)
    if variant == "heap fix off":
        site = out / "site"
        site.mkdir(parents=True, exist_ok=True)
        (site / "sitecustomize.py").write_text(_NO_FIX)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    demo = Path(sys.executable).with_name("fedclip-coord")
    argv = [str(demo), "demo", "--agents", str(args.agents), "--rounds", str(args.rounds), "--strategy",
            args.strategy, "--per-agent", str(args.per_agent), "--out", str(out / "demo")]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak: dict[int, int] = {}
    while proc.poll() is None:
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                cmd = child.cmdline()
                if "start" in cmd and any("device_agent" in c or "fedclip-agent" in c for c in cmd):
                    peak[child.pid] = max(peak.get(child.pid, 0), child.memory_info().rss)
            except psutil.Error:
                continue
        time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed ({variant}): {(proc.stderr.read() if proc.stderr else '')[-2000:]}")
    if len(peak) != args.agents:
        raise SystemExit(f"{variant}: sampled {len(peak)} agent processes, expected {args.agents}")
    return sorted(v / 2**20 for v in peak.values())


def report(doc: dict) -> str:
    """The markdown of a run's JSON (`python -c` on it regenerates the report)."""
    a = doc["args"]
    rows = []
    for variant, reps in doc["peaks_mib"].items():
        flat = [p for peaks in reps for p in peaks]
        rows.append(
            [variant, f"{statistics.median(flat):.0f}", f"{min(flat):.0f}-{max(flat):.0f}", len(flat)]
        )
    md = [
        "# A running agent's peak memory over rounds (ORT training backend)",
        "",
        f"`{doc['command']}` ({doc['when']}): `fedclip-coord demo --agents {a['agents']} --rounds "
        f"{a['rounds']} --strategy {a['strategy']} --per-agent {a['per_agent']}`, fedclip-tiny, each round's "
        f"task asking for a fresh AdamW (the coordinator's default); variants alternated, {a['repeats']} "
        "runs each. Load average (1 min) at the start and after each run: "
        f"{', '.join(f'{x[0]:.1f}' for x in doc['loadavg'])}.",
        "",
        md_table(["agent", "median peak RSS (MiB)", "range", "agent processes"], rows),
        "",
        f"As built / heap fix off: {doc['as_built_over_fix_off']:.2f}x.",
        "",
        (__doc__ or "").split("\n\n", 2)[2].strip(),
    ]
    return "\n".join(md) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--strategy", default="ce-lora")
    ap.add_argument("--per-agent", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    runs: dict[str, list[list[float]]] = {v: [] for v in VARIANTS}
    load = [loadavg()]
    with tempfile.TemporaryDirectory(prefix="fedclip-rss-") as tmp:
        for rep in range(args.repeats):
            for variant in VARIANTS if rep % 2 == 0 else VARIANTS[::-1]:
                peaks = run_demo(args, variant, Path(tmp) / f"{rep}-{variant.replace(' ', '-')}")
                runs[variant].append(peaks)
                print(f"{variant}: peak agent RSS {', '.join(f'{p:.0f}' for p in peaks)} MiB", flush=True)
                load.append(loadavg())
    ratio = statistics.median(p for r in runs["as built"] for p in r) / statistics.median(
        p for r in runs["heap fix off"] for p in r
    )
    doc = {"when": utc_now(), "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
           "command": "python benchmarks/bench_agent_rounds_rss.py " + " ".join(sys.argv[1:]),
           "peaks_mib": runs, "as_built_over_fix_off": ratio, "loadavg": load}  # fmt: skip
    write_json(args.out.with_suffix(".json"), doc)
    args.out.with_suffix(".md").write_text(report(doc))
    print(f"wrote {args.out}.md, .json")


if __name__ == "__main__":
    main()
