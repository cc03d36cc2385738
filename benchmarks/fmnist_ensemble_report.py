"""`fmnist_ensemble.py --report RUN.json ...` -> results/fmnist_ensemble.{md,json,png}.

Numbers are means over agents; differences to local-only are paired per seed, then mean ± sd over
seeds. The reading is `results/fmnist_ensemble_notes.md`, put at the end when present.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _plots import panel_grid  # the benchmarks folder: run as fmnist_ensemble.py --report
from fmnist_ceiling_report import TARGET_OWN, _ms, _seeds, write_runs_report

BASELINE = "local-only"


def _gain(seeds: list[dict], row: str, which: int) -> list[float]:
    return [100.0 * (s[row][which] - s[BASELINE][which]) for s in seeds]


def summary(runs: dict) -> list[str]:
    """One row per fleet: local-only's own, then each method's own gain over it (bold: >= +5)."""
    methods = [m for m in _seeds(next(iter(runs.values())))[0] if m != BASELINE]
    lines = ["| fleet | local-only own (%) | " + " | ".join(methods) + " |",
             "|---|---:|" + "---:|" * len(methods)]  # fmt: skip
    for name, run in runs.items():
        seeds = _seeds(run)
        cells = []
        for m in methods:
            gain = _gain(seeds, m, 0)
            cells.append(f"**{_ms(gain)}**" if np.mean(gain) >= TARGET_OWN else _ms(gain))
        local = _ms(100.0 * s[BASELINE][0] for s in seeds)
        lines.append(f"| {name} | {local} | " + " | ".join(cells) + " |")
    return lines


def detail(name: str, run: dict) -> list[str]:
    seeds = _seeds(run)
    out = [f"### {name}", "", f"`{run['command']}` ({run['seconds'] / 60:.1f} min)", "",
           "| adapter(s) | own (%) | all-class (%) | own - local-only | all-class - local-only |",
           "|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in seeds[0]:
        own, every = (_ms(100.0 * s[row][i] for s in seeds) for i in (0, 1))
        out.append(f"| {row} | {own} | {every} | {_ms(_gain(seeds, row, 0))} | {_ms(_gain(seeds, row, 1))} |")
    return [*out, ""]


def plot(runs: dict, path: Path) -> None:
    plt, fig, axes = panel_grid(len(runs), 3, 4.4, 3.6)
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        seeds = _seeds(run)
        rows = [r for r in seeds[0] if r != BASELINE]
        gains = [np.mean(_gain(seeds, r, 0)) for r in rows]
        errs = [np.std(_gain(seeds, r, 0), ddof=1) if len(seeds) > 1 else 0.0 for r in rows]
        ax.barh(rows, gains, xerr=errs, color=["#4e79a7" if "fleet" in r else "#76b7b2" for r in rows])
        ax.axvline(TARGET_OWN, color="#e15759", ls="--", lw=1, label="target: local-only + 5")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("own - local-only (points)")
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0].legend(fontsize=7)
    title = "own accuracy over local-only: the fleet's adapter, and ensembles with the local one"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def preface(runs: dict) -> list[str]:
    title = "## Own accuracy over local-only (points; mean ± sd over seeds; bold: the target, +5, met)"
    return [title, "", *summary(runs), ""]


def write_report(paths: list[Path], out: Path, doc: str) -> None:
    """`doc`: fmnist_ensemble's docstring (its commands and protocol open the report)."""
    title = "FMNIST-FL: two adapters on the device (its own and the fleet's) against issue 13's own target"
    write_runs_report(paths, out, "fmnist_ensemble", title, doc, preface, detail, plot)
