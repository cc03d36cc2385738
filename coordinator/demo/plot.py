"""The demo's plot (accuracy.png): per agent and on average, grouped bars of zero-shot, local-only and
federated accuracy, on the own test split and on the all-class set; and the own split per round."""

from __future__ import annotations

from pathlib import Path

from fedclip.coordinator.demo.comparison import GATED, PERSONAL, SETS
from fedclip.coordinator.demo.report import SET_TITLES, column_names, report_columns

COLOURS = {
    "zero_shot": "#9e9e9e",
    "local_only": "#f28e2b",
    "federated": "#4e79a7",
    GATED: "#76b7b2",
    PERSONAL: "#59a14f",
}


def plot_accuracy(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a device or in CI
    import matplotlib.pyplot as plt

    bars = "mean" in report  # a report without a comparison has the per-round panel only
    size = (15, 4.8) if bars else (6, 4.2)  # the taller one leaves room for legends under the bars
    fig, axes = plt.subplots(1, 3 if bars else 1, figsize=size, dpi=110, squeeze=False)
    if bars:
        for ax, name in zip(axes[0][:2], SETS, strict=True):
            _bars(ax, report, name)
    _rounds(axes[0][-1], report)
    n = len(report["agents"])
    fig.suptitle(f"fedclip demo: {n} agents on {report['dataset']}, fedclip = {report['config']['strategy']}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _bars(ax, report: dict, name: str) -> None:
    groups = [*report["agents"], "mean"]
    rows = [report["agents"][a][name] for a in report["agents"]] + [report["mean"][name]]
    shown = report_columns(report)
    if all(row[c] is None for row in rows for c in shown):
        ax.text(0.5, 0.5, f"no {SET_TITLES[name]} set", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    names = column_names(report)
    width = 0.8 / len(shown)
    for k, column in enumerate(shown):
        xs = [i + (k - (len(shown) - 1) / 2) * width for i in range(len(groups))]
        ys = [float("nan") if row[column] is None else row[column] for row in rows]
        ax.bar(xs, ys, width, label=names[column], color=COLOURS[column])
    rotated = len(groups) > 6
    ax.set_xticks(range(len(groups)), groups, rotation=30 if rotated else 0, fontsize="small")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(
        f"{SET_TITLES[name]} test set" + (" (every label, the agent's camera)" if name != "own" else "")
    )
    ax.grid(axis="y", alpha=0.3)
    # under the axes: inside, four or five columns' legend covers the bars
    # (lower under rotated agent names, which reach further down)
    below = -0.24 if rotated else -0.1
    ax.legend(fontsize="small", ncol=min(len(shown), 3), loc="upper center", bbox_to_anchor=(0.5, below))


def _rounds(ax, report: dict) -> None:
    from matplotlib.ticker import MaxNLocator

    series = [a["accuracy_per_round"] for a in report["agents"].values()]
    for aid, ys in zip(report["agents"], series, strict=True):
        ax.plot(
            range(len(ys)), [float("nan") if y is None else y for y in ys], marker="o", label=aid, alpha=0.6
        )
    if series:
        mean = [sum(v for v in col if v is not None) / max(1, sum(v is not None for v in col))
                for col in zip(*series, strict=True)]  # fmt: skip
        ax.plot(range(len(mean)), mean, "k-", lw=2.5, marker="s", label="mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round (0 = before federation)")
    ax.set_ylabel("accuracy on own test split")
    ax.set_title("own test split, per round")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
