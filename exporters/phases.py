"""Export phases: what the progress bar shows and what the export profile measures.

An export runs under `recording(Phases(...))`; any exporter module marks a phase with
`with phase("tracing step graph"):`. Each phase records its wall time, the process's CPU time
(what a busy shared machine distorts least) and its peak RSS (VmHWM; the peak is reset at each
phase start where Linux allows it, so it is that phase's own peak), and tells the progress
callback its name. Outside `recording` a phase costs nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field


def _vm_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS to the current RSS
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PhaseRecord:
    name: str
    seconds: float
    cpu_seconds: float  # the process's CPU time in the phase, all threads
    peak_rss_mb: float | None  # this phase's peak (whole process RSS) if the peak could be reset
    depth: int  # 0: a top-level phase; 1: inside another phase
    forked: bool = False  # run in the export's forked worker (`background`): its own CPU and RSS


@dataclass
class Phases:
    """Records phases; `on_phase(name, depth)` (the progress bar) hears each phase start."""

    on_phase: Callable[[str, int], None] | None = None
    records: list[PhaseRecord] = field(default_factory=list)
    # Peaks (kB) seen inside each running phase: a nested phase resets the process's peak, so it
    # hands its own peak up to the phase around it.
    _stack: list[int] = field(default_factory=list)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self.on_phase is not None:
            self.on_phase(name, len(self._stack))
        resettable = _reset_peak()
        start, cpu = time.perf_counter(), time.process_time()
        self._stack.append(0)
        try:
            yield
        finally:
            inner = self._stack.pop()
            hwm = _vm_kb("VmHWM") if resettable else None
            seconds = time.perf_counter() - start
            cpu_seconds = time.process_time() - cpu
            peak = max(hwm or 0, inner)
            if self._stack:
                self._stack[-1] = max(self._stack[-1], peak)
            mb = round(peak / 1024, 1) if resettable and peak else None
            self.records.append(
                PhaseRecord(name, round(seconds, 3), round(cpu_seconds, 3), mb, len(self._stack))
            )

    def summary(self) -> list[dict]:
        return [r.__dict__.copy() for r in self.records]


_current: Phases | None = None


@contextlib.contextmanager
def recording(phases: Phases) -> Iterator[Phases]:
    global _current
    saved, _current = _current, phases
    try:
        yield phases
    finally:
        _current = saved


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    if _current is None:
        yield
        return
    with _current(name):
        yield


@contextlib.contextmanager
def progress_bar(show: bool, total: int, phases: Phases) -> Iterator[None]:
    """A rich progress bar on stderr that follows `phases`: one tick per top-level phase, the
    current (inner) phase's name as its description."""
    if not show:
        yield
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    # Redrawn at each phase, not by rich's refresh thread: an export may fork (`background`), which
    # only a process of one thread does safely.
    with Progress(
        TextColumn("{task.description:<44}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        auto_refresh=False,
    ) as progress:
        task = progress.add_task("export", total=total)
        top = [0]

        def on_phase(name: str, depth: int) -> None:
            if depth == 0:
                if top[0]:
                    progress.advance(task)
                top[0] += 1
            progress.update(task, description=("  " * depth + name)[:44], refresh=True)

        saved, phases.on_phase = phases.on_phase, on_phase
        try:
            yield
        finally:
            phases.on_phase = saved
        progress.update(task, completed=total, description="done", refresh=True)
