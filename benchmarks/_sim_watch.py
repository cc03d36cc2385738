"""Watching the processes of a simulated round: CPU and peak RSS from /proc, phases from the log."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path


# ---- process monitoring ---------------------------------------------------------------------------
def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _tree(pid: int) -> list[int]:
    """`pid` and its live descendants (the coordinator's intake workers and their forkserver)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def proc_sample(pid: int) -> tuple[float, float] | None:
    """(cpu seconds user+system, peak RSS MB) of a live process and its descendants from /proc: the
    CPU of all of them (a reaped child's in its parent's), the sum of their peak RSS."""
    cpu, hwm = 0.0, 0.0
    for p in _tree(pid):
        try:
            stat = _stat(p)
            cpu += sum(int(stat[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    hwm += int(line.split()[1]) / 1024
        except (OSError, IndexError, ValueError):
            if p == pid:
                return None
    return cpu, hwm


class Monitor(threading.Thread):
    """Samples CPU and peak RSS of named processes every `every` seconds."""

    def __init__(self, pids: dict[str, int], every: float = 0.5):
        super().__init__(daemon=True)
        self.pids, self.every = pids, every
        self.samples: dict[str, list[tuple[float, float, float]]] = {k: [] for k in pids}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every)

    def sample(self) -> None:
        now = time.time()
        for name, pid in self.pids.items():
            s = proc_sample(pid)
            if s is not None:
                self.samples[name].append((now, *s))

    def cpu_between(self, name: str, t0: float, t1: float) -> float:
        rows = self.samples[name]
        if not rows:
            return 0.0

        def at(t: float) -> float:
            before = [r[1] for r in rows if r[0] <= t]
            return before[-1] if before else rows[0][1]

        return round(at(t1) - at(t0), 2)

    def peak_rss(self, name: str) -> float:
        return round(max((r[2] for r in self.samples[name]), default=0.0), 1)

    def cpu_total(self, name: str) -> float:
        rows = self.samples[name]
        return round(rows[-1][1] - rows[0][1], 2) if rows else 0.0


class LogWatch(threading.Thread):
    """Reads the coordinator's log lines and timestamps the ones that mark round phases."""

    PATTERNS = {
        "connected": re.compile(r"MQTT connected to \S+ as '(fedclip-coord)"),
        "started": re.compile(r"round (\d+): started with (\d+)"),
        "aggregated": re.compile(r"round (\d+): aggregated (\d+) updates with \S+ in ([\d.]+)s"),
        "failed": re.compile(r"round (\d+): (failed|below quorum)"),
    }

    def __init__(self, stream, log_path: Path):
        super().__init__(daemon=True)
        self.stream, self.log_path = stream, log_path
        self.events: dict[str, float] = {}
        self.aggregate_seconds: dict[int, float] = {}
        self.errors: list[str] = []

    def run(self) -> None:
        # Line-buffered: a test reads the file while the coordinator runs.
        with open(self.log_path, "a", buffering=1) as out:
            for raw in self.stream:
                line = raw.decode(errors="replace")
                out.write(line)
                for name, pat in self.PATTERNS.items():
                    m = pat.search(line)
                    if m:
                        key = name if name == "connected" else f"{name}_r{m.group(1)}"
                        self.events.setdefault(key, time.time())
                        if name == "aggregated":
                            self.aggregate_seconds[int(m.group(1))] = float(m.group(3))
                if " ERROR " in line or "Traceback" in line:
                    self.errors.append(line.strip()[:300])
