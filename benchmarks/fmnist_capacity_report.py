"""`fmnist_capacity.py --report RUN.json ...` -> results/fmnist_capacity.{md,json,png}.

Numbers are means over agents; differences to local-only (with the same adapter) are paired per
seed, then mean ± sd over seeds. The reading is `results/fmnist_capacity_notes.md`, at the end.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
from _plots import panel_grid  # the benchmarks folder: run as fmnist_capacity.py --report
from fmnist_ceiling_report import TARGET_OWN, _ms, _seeds, write_runs_report

METHODS = ("fleet-lora-bsm", "all-pooled-bsm")
WHAT = "own accuracy over training alone, by adapter size"  # the plot's title


def _pts(seeds: list[dict], adapter: str, row: str, which: int, minus_local: bool = False) -> list[float]:
    return [100.0 * (s[adapter][row][which] - (s[adapter]["local-only"][which] if minus_local else 0.0))
            for s in seeds]  # fmt: skip


def table(name: str, run: dict, methods=METHODS, first: str = "adapter") -> list[str]:
    """The run's section: a row per adapter (`first` names the column), own gains of `methods`."""
    seeds = _seeds(run)
    gain_heads = "".join(f"| {m} own - local-only " for m in methods)
    out = [f"### {name}", "", f"`{run['command']}` ({run['seconds'] / 60:.1f} min)", "",
           f"| {first} | exchanged parameters | local-only own / all-class (%) {gain_heads}"
           f"| {methods[0]} all-class - local-only |",
           "|---|---:|---:|" + "---:|" * (len(methods) + 1)]  # fmt: skip
    for adapter in seeds[0]:
        local = f"{_ms(_pts(seeds, adapter, 'local-only', 0))} / {_ms(_pts(seeds, adapter, 'local-only', 1))}"
        gains = []
        for m in methods:
            g = _pts(seeds, adapter, m, 0, minus_local=True)
            gains.append(f"**{_ms(g)}**" if np.mean(g) >= TARGET_OWN else _ms(g))
        every = _ms(_pts(seeds, adapter, methods[0], 1, minus_local=True))
        params = seeds[0][adapter]["params"]
        out.append(f"| {adapter} | {params:,} | {local} | {' | '.join(gains)} | {every} |")
    return [*out, ""]


def plot(runs: dict, path: Path, methods=METHODS, what: str = WHAT) -> None:
    plt, fig, axes = panel_grid(len(runs), 3, 4.6, 3.4)
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        seeds = _seeds(run)
        adapters = list(seeds[0])
        xs = np.arange(len(adapters))
        for k, (m, colour) in enumerate(zip(methods, ("#4e79a7", "#9e9e9e"), strict=True)):
            gains = [np.mean(_pts(seeds, a, m, 0, minus_local=True)) for a in adapters]
            ax.bar(xs + (k - 0.5) * 0.38, gains, 0.38, label=m, color=colour)
        ax.axhline(TARGET_OWN, color="#e15759", ls="--", lw=1, label="target: local-only + 5")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(xs, [textwrap.fill(a, 14) for a in adapters], fontsize=8)
        ax.set_ylabel("own - local-only, same adapter (points)", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(textwrap.fill(f"{what} (means over seeds)", 28 * min(len(runs), 3)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def preface(runs: dict) -> list[str]:
    return ["Own gains are over local-only with the same adapter (points, mean ± sd over seeds; bold: "
            "the target, +5, met).", ""]  # fmt: skip


def write_report(paths: list[Path], out: Path, doc: str) -> None:
    """`doc`: fmnist_capacity's docstring (its commands and protocol open the report)."""
    title = "FMNIST-FL: the own target against the adapter's size"
    write_runs_report(paths, out, "fmnist_capacity", title, doc, preface, table, plot)
