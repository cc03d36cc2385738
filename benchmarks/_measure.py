"""Shared helpers of the training benchmarks: isolated runs, step timing, machine facts, reports.

Every measured variant runs in a fresh interpreter so its peak RSS is its own. The parent reads the
child's peak from `os.wait4`, the per-child form of `getrusage(RUSAGE_CHILDREN).ru_maxrss`: the
latter is the maximum over *all* children waited for so far, so after a big child every smaller one
would read the big one's peak. The child prints its result as one JSON line prefixed by `RESULT_TAG`.

Keep the parent lean (no numpy, torch or fedclip imports, no data): Linux carries a process's RSS
high-water mark across exec, so a child forked from a 400 MB parent reports ru_maxrss >= 400 MB
even if it only runs `python -c pass`. Data preparation therefore runs in a worker child too;
`ChildRun.parent_rss_mb` records the parent's RSS at spawn time, the floor of every reading.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as pkg_version
from pathlib import Path
from typing import Any

RESULT_TAG = "@@bench-result "
RESULTS = Path(__file__).resolve().parent / "results"
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ---- parent side ---------------------------------------------------------------------------------
@dataclass
class ChildRun:
    argv: list[str]
    rc: int
    peak_rss_mb: float  # the child's own ru_maxrss (includes the interpreter and its imports)
    parent_rss_mb: float  # the parent's RSS when it forked: a floor under peak_rss_mb (see above)
    wall_s: float
    result: dict[str, Any] | None  # the child's RESULT_TAG line, if it printed one
    stdout: str
    stderr_tail: str

    def check(self) -> dict[str, Any]:
        if self.rc != 0 or self.result is None:
            raise RuntimeError(
                f"benchmark child failed (rc {self.rc}): {' '.join(self.argv[:6])} ...\n{self.stderr_tail}"
            )
        return self.result


def thread_env(threads: int, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    env.setdefault("PYTHONHASHSEED", "0")
    env.update(extra or {})
    return env


def run_child(
    argv: Sequence[str], *, timeout: float, env: dict[str, str] | None = None, cwd: str | Path | None = None
) -> ChildRun:
    """Run `argv` to completion in a fresh process; return its exit code, peak RSS and output."""
    argv = [str(a) for a in argv]
    parent_rss = rss_mb()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(argv, stdout=out, stderr=err, env=env, cwd=cwd)
        status, usage = 0, None
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
        proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
        wall = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    result = None
    for line in stdout.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG) :])
    rc = proc.returncode if wall <= timeout else 124
    return ChildRun(argv, rc, usage.ru_maxrss / 1024.0, parent_rss, wall, result, stdout, stderr[-3000:])


def run_worker(script: str, name: str, spec: dict, threads: int, timeout: float = 3600) -> ChildRun:
    """`script --worker NAME --spec JSON` at nice 15 with `threads` threads per library, checked:
    the benchmarks that run each variant in a fresh process (its peak RSS its own) call this."""
    argv = ["nice", "-n", "15", sys.executable, script, "--worker", name, "--spec", json.dumps(spec)]
    run = run_child(argv, timeout=timeout, env=thread_env(threads))
    run.check()
    return run


# ---- child side ----------------------------------------------------------------------------------
def emit(result: dict[str, Any]) -> None:
    """Print the child's result (with its own peak and current RSS) for `run_child`."""
    result = dict(result, child_peak_rss_mb=peak_rss_mb(), child_rss_end_mb=rss_mb())
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def rss_mb() -> float:
    """Current resident set size of this process (MiB)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_steps(step: Callable[[], Any], warmup: int, steps: int) -> dict[str, Any]:
    """Run `warmup` untimed then `steps` timed calls of `step`; per-step seconds and their summary."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return summarize(times)


def summarize(times: Sequence[float]) -> dict[str, Any]:
    return {
        "step_s_median": statistics.median(times),
        "step_s_mean": statistics.fmean(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "step_times_s": [round(t, 5) for t in times],
    }


# ---- machine and report --------------------------------------------------------------------------
def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("fedclip", "torch", "open_clip_torch", "onnx", "onnxruntime-training-cpu", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[dist] = pkg_version(dist)
    return out


def machine() -> dict[str, Any]:
    mem_gb = float("nan")
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gb = round(int(line.split()[1]) / 1024**2, 1)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "mem_total_gb": mem_gb,
        "platform": platform.platform(),
        "versions": versions(),
    }


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    return path


def write_md_json(out: Path, name: str, lines: Sequence[str], doc: Any) -> None:
    """`out/<name>.md`: `lines`, then the reading written by hand (`<name>_notes.md`) when there is
    one; `out/<name>.json`: `doc`, what the report is made again from."""
    notes = out / f"{name}_notes.md"
    if notes.exists():
        lines = [*lines, "", notes.read_text().strip()]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.2f} {unit}"
        n /= 1000.0
    return f"{n} GB"


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
