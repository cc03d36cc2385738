"""The real-path regimes before and after session 15's fix: agents start AdamW afresh every round.

    python benchmarks/fmnist_reset_report.py      # -> results/fmnist_reset.{md,png}

Until session 15 the coordinator never set a task's `reset_optimizer`, so each agent began a round at
the strategy's new start adapter with the AdamW moments of its own last round, which steer back
toward its own adapter; the coordinator asks for the reset by default since (`reset_optimizer: true`,
docs/aggregation.md). This sets the real-path runs of `fmnist_regimes.json` (made with the reset)
beside `fmnist_regimes_real_kept.json` (the same fleets, seeds and methods run before it), per fleet
and method: own accuracy, own minus local-only, all-class accuracy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fmnist_regimes_report import ORDER, _paired, _real_means

RESULTS = Path(__file__).resolve().parent / "results"
KEPT = RESULTS / "fmnist_regimes_real_kept.json"  # {run name: fmnist_fl_regimes.py doc}, moments kept
NAME = "fmnist_reset"
TARGET = 5.0  # issue 13: own >= local-only + 5 points


def _pct(vals: list[float]) -> str:
    return f"{100 * np.mean(vals):.1f}" if vals else "-"


def _gain(run: dict, method: str) -> tuple[float, float] | None:
    own, local = _real_means(run, method)[0], _real_means(run, "local-lora")[0]
    return _paired(own, local) if own and len(own) == len(local) else None


def _fmt(ms: tuple[float, float] | None) -> str:
    return "-" if ms is None else f"{ms[0]:+.1f} ± {ms[1]:.1f}"


def rows(kept: dict, reset: dict) -> list[tuple[str, str, dict, dict]]:
    """(fleet, method, kept's numbers, reset's) for every trained method both ran on a fleet (zero-shot
    and local-only do not train in rounds: equal in both)."""
    out = []
    for name, after in reset.items():
        before = kept.get(name)
        if before is None:
            continue
        for m in ORDER:
            if m in ("zero-shot", "local-lora") or not all(_real_means(r, m)[0] for r in (before, after)):
                continue
            cells = []
            for run in (before, after):
                own, alls = _real_means(run, m)
                cells.append({"own": _pct(own), "gain": _gain(run, m), "all": _pct(alls)})
            out.append((name, m, *cells))
    return out


def _lines(table: list[tuple[str, str, dict, dict]], reset: dict) -> list[str]:
    lines = [
        "# FMNIST-FL, real path: agents keeping AdamW's moments across rounds vs starting afresh",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "Commands (the same for both; `fmnist_fl.md` lists every one):",
        "",
        *[f"    {run['command']}" for run in reset.values()],
        "",
        "Points and %, mean over agents and seeds (± sd over seeds of the per-seed difference).",
        "",
        "| fleet | method | own %: kept | reset | own - local-only: kept | reset | all-class %: kept "
        "| reset |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m, k, r in table:
        lines.append(
            f"| {name} | {m} | {k['own']} | {r['own']} | {_fmt(k['gain'])} | {_fmt(r['gain'])} | "
            f"{k['all']} | {r['all']} |"
        )
    notes = RESULTS / f"{NAME}_notes.md"  # the reading, written by hand
    if notes.is_file():
        lines += ["", notes.read_text().rstrip("\n")]
    return lines + ["", f"![{NAME}]({NAME}.png)", ""]


def _plot(table: list[tuple[str, str, dict, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fleets = list(dict.fromkeys(t[0] for t in table))
    fig, axes = plt.subplots(1, len(fleets), figsize=(4.2 * len(fleets), 4.2), sharey=True, squeeze=False)
    for ax, fleet in zip(axes[0], fleets, strict=True):
        got = [t for t in table if t[0] == fleet and t[2]["gain"] and t[3]["gain"]]
        x = np.arange(len(got))
        for k, (label, idx) in enumerate((("moments kept", 2), ("AdamW reset (default)", 3))):
            means = [t[idx]["gain"][0] for t in got]
            sds = [t[idx]["gain"][1] for t in got]
            ax.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=sds, capsize=2, label=label)
        ax.axhline(TARGET, color="red", ls=":", label=f"target +{TARGET:g}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(x, [t[1] for t in got], rotation=60, ha="right", fontsize=6)
        ax.set_title(f"{fleet} (real path)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("own accuracy minus local-only (points)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    reset = json.loads((RESULTS / "fmnist_regimes.json").read_text())["real"]
    table = rows(json.loads(KEPT.read_text()), reset)
    (RESULTS / f"{NAME}.md").write_text("\n".join(_lines(table, reset)))
    _plot(table, RESULTS / f"{NAME}.png")
    print(f"wrote {RESULTS / NAME}.md, .png")


if __name__ == "__main__":
    main()
