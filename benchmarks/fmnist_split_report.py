"""`fmnist_split.py --report RUN.json ...` -> results/fmnist_split.{md,json,png}.

Numbers are means over agents; differences to local-only are paired per seed, then mean ± sd over
seeds. The reading is `results/fmnist_split_notes.md`, at the end.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
from fmnist_capacity_report import plot, table  # the benchmarks folder: run as fmnist_split.py --report
from fmnist_ceiling_report import _seeds, write_runs_report

METHODS = ("fleet-lora-bsm", "fedavg-bsm")


def preface(runs: dict) -> list[str]:
    out = [
        "Own gains are over local-only, the whole adapter trained alone (points, mean ± sd over "
        "seeds; bold: the target, +5, met). Exchanged parameters: what an update carries.",
        "",
        "How personal fleet-lora's mix already is (the coordinator's weights, means over agents "
        "and seeds, % of an agent's new adapter):",
        "",
        "| run | from the agent's own update | from its camera group (itself included) |",
        "|---|---:|---:|",
    ]  # the weights: fmnist_split.mixing_weights
    for name, run in runs.items():
        rows = [s["whole adapter mixed"] for s in _seeds(run)]
        own, group = (100 * np.mean([r[f"fleet-lora {k} weight"] for r in rows]) for k in ("self", "group"))
        out.append(f"| {name} | {own:.0f} | {group:.0f} |")
    return [*out, ""]


def write_report(paths: list[Path], out: Path, doc: str) -> None:
    """`doc`: fmnist_split's docstring (its commands and protocol open the report)."""
    title = "FMNIST-FL: the own target with a shared and a personal part of the adapter"
    section = partial(table, methods=METHODS, first="split")
    what = "own accuracy over training alone, by what stays on the device"
    draw = partial(plot, methods=METHODS, what=what)
    write_runs_report(paths, out, "fmnist_split", title, doc, preface, section, draw)
