"""`fmnist_personal.py --report RUN.json ...` -> results/fmnist_personal.{md,json,png}.

The same per-seed arithmetic as `fmnist_ceiling_report` (means over agents, then mean ± sd over
seeds of per-seed differences). The reading is `results/fmnist_personal_notes.md`, put after the
summary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fmnist_ceiling_report import TARGET_ALL, _ms, _pts, _seeds, detail

# (row, prior weight at inference): the rows the summary compares, in this order
BASELINES = (("fedavg", "0.0"), ("fedavg-bsm", "1.0"), ("fleet-lora", "0.0"), ("fleet-lora-bsm", "1.0"))


def _compared(run: dict) -> list[tuple[str, str]]:
    personal = [(k, "0.0") for k in _seeds(run)[0] if k.startswith(("ditto", "tune", "pull"))]
    return [*BASELINES, *personal]


def _diffs(run: dict, row: str, scale: str) -> tuple[list[float], list[float]]:
    """Per seed: (own - local-only, all-class - bar), bar the better of zero-shot and FedAvg-LoRA."""
    own, alls = [], []
    for s in _seeds(run):
        bar = max(_pts(s, "zero-shot", which=1), _pts(s, "fedavg", which=1))
        own.append(_pts(s, row, scale) - _pts(s, "local-only"))
        alls.append(_pts(s, row, scale, 1) - bar)
    return own, alls


def _label(row: str, scale: str) -> str:
    return row + (" (prior x1)" if scale == "1.0" else "")


def summary(runs: dict) -> list[str]:
    names = list(runs)
    out = [
        "| method | " + " | ".join(names) + " | all-class met in |",
        "|---|" + "---:|" * len(names) + "---:|",
    ]
    for row, scale in _compared(next(iter(runs.values()))):
        cells, met = [], 0
        for run in runs.values():
            own, alls = _diffs(run, row, scale)
            ok = np.mean(alls) >= TARGET_ALL
            met += ok
            cell = f"{np.mean(own):+.1f} / {np.mean(alls):+.1f}"
            cells.append(f"**{cell}**" if ok else cell)
        out.append(f"| {_label(row, scale)} | " + " | ".join(cells) + f" | {met} of {len(names)} |")
    return out


def spreads(runs: dict) -> list[str]:
    out = ["| run | local-only own (%) | bar (%) | method | own - local-only | all-class - bar |",
           "|---|---:|---:|---|---:|---:|"]  # fmt: skip
    for name, run in runs.items():
        seeds = _seeds(run)
        local = _ms(_pts(s, "local-only") for s in seeds)
        bar = _ms(max(_pts(s, "zero-shot", which=1), _pts(s, "fedavg", which=1)) for s in seeds)
        for row, scale in _compared(run):
            own, alls = _diffs(run, row, scale)
            out.append(f"| {name} | {local} | {bar} | {_label(row, scale)} | {_ms(own)} | {_ms(alls)} |")
    return out


def _families(run: dict) -> dict[str, list[tuple[str, str]]]:
    """The compared rows by family: a baseline alone, or a personal method over its mu (or rho) values."""
    out: dict[str, list[tuple[str, str]]] = {}
    for row, scale in _compared(run):
        out.setdefault(row.split(" ")[0] if row.startswith(("ditto", "tune", "pull")) else _label(row, scale),
                       []).append((row, scale))  # fmt: skip
    return out


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4.6), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs.items(), strict=True):
        for i, (family, rows) in enumerate(_families(run).items()):
            pts = [tuple(np.mean(d) for d in _diffs(run, row, scale)) for row, scale in rows]
            style = "s" if len(rows) == 1 else "o-"  # squares: the coordinator's strategies alone
            label = (
                family
                if len(rows) == 1
                else f"{family} ({rows[0][0].split(' ', 1)[1]} .. {rows[-1][0].split()[-1]})"
            )
            ax.plot(*zip(*pts, strict=True), style, ms=5, color=plt.get_cmap("tab10")(i % 10), label=label)
            if len(rows) > 1:  # the smallest weight is where the line starts
                ax.plot(*pts[0], "k.", ms=3)
        ax.axhline(TARGET_ALL, color="k", ls="--", lw=0.8)
        ax.axvline(0.0, color="grey", ls=":", lw=0.8)
        ax.set_title(name)
        ax.set_xlabel("own - local-only (points)")
        ax.set_ylabel("all-class - better of zero-shot, FedAvg-LoRA (points)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=7)
    fig.suptitle("issue 13's all-class target is the dashed line (>= -2); lines: one method over its "
                 "proximal weight (black dot: the smallest); means over seeds", fontsize=9)  # fmt: skip
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, dpi=110)


def write_report(paths: list[Path], out: Path) -> None:
    runs = {p.stem: json.loads(p.read_text()) for p in paths}
    (out / "fmnist_personal.json").write_text(json.dumps(runs, indent=1))
    lines = [
        "# FMNIST-FL: personal adapters beside the fleet's (Ditto) for issue 13's all-class target",
        "",
        'Commands (each run\'s own is under "Every row"), then `python benchmarks/fmnist_personal.py '
        "--report /tmp/personal/*.json`. The protocol is the script's docstring.",
        "",
        "## Summary: own - local-only / all-class - bar "
        "(points, means over seeds; bold: all-class target met)",
        "",
        *summary(runs),
        "",
        "bar: the better of zero-shot and FedAvg-LoRA on all-class (the target is bar - 2). "
        "`(prior x1)`: balanced-softmax adapters scored with the agent's label prior added at inference.",
        "",
    ]
    notes = out / "fmnist_personal_notes.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    lines += ["![own vs all-class against local-only and the bar](fmnist_personal.png)", "",
              "## Spreads (mean ± sd over seeds of the per-seed differences)", "", *spreads(runs), "",
              "## Every row", ""]  # fmt: skip
    for name, run in runs.items():
        lines += detail(name, run)
    (out / "fmnist_personal.md").write_text("\n".join(lines).rstrip() + "\n")
    plot(runs, out / "fmnist_personal.png")
    print(f"report: {out / 'fmnist_personal.md'}")
