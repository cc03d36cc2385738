"""The demo's report: one dict (report.json), a Markdown table, rich tables and an accuracy plot."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rich.table import Table

from fedclip.coordinator.demo.config import DemoConfig
from fedclip.coordinator.demo.federation import FleetRun


# ---- report ------------------------------------------------------------------------------------
def _num(rec: dict, *keys: str) -> float | None:
    for k in keys:
        v = rec.get(k)
        if isinstance(v, (int, float)):
            return float(v)
    return None


def build_report(
    cfg: DemoConfig,
    dataset: str,
    labels: list[str],
    run: FleetRun,
    acc: dict[str, list[float | None]],
    wall_s: float,
) -> dict:
    rounds = []
    for rec in run.rounds:
        rec = {**rec, **run.costs.get(rec["round"], {})}
        up, down = _num(rec, "uplink_bytes"), _num(rec, "downlink_bytes")
        rounds.append(
            {
                "round": rec["round"],
                "seconds": _num(rec, "seconds"),
                "uplink_bytes": up,
                "downlink_bytes": down,
                "bytes": (up or 0) + (down or 0) if up is not None or down is not None else None,
                "updates": rec.get("updates"),
                "agent_metrics": rec.get("metrics", {}),
            }
        )
    agents = {
        aid: {"accuracy_before": s[0], "accuracy_after": s[-1], "accuracy_per_round": s}
        for aid, s in acc.items()
    }
    before = [s[0] for s in acc.values() if s[0] is not None]
    after = [s[-1] for s in acc.values() if s[-1] is not None]
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "password"}
    return {
        "config": config,
        "dataset": dataset,
        "labels": labels,
        "agents": agents,
        "rounds": rounds,
        "mean_accuracy_before": sum(before) / len(before) if before else None,
        "mean_accuracy_after": sum(after) / len(after) if after else None,
        "bytes_total": sum(r["bytes"] or 0 for r in rounds),
        "federation_seconds": run.seconds,
        "total_seconds": wall_s,
        "run_dir": str(cfg.run_dir),
        "notes": _notes(cfg, run),
    }


def _notes(cfg: DemoConfig, run: FleetRun) -> list[str]:
    notes = []
    if cfg.pretrained is None and cfg.bundle is None:
        notes.append(f"{cfg.model} has random weights (no --pretrained): accuracies start near chance")
    if run.final_missing:
        notes.append(
            "the last round's adapter did not reach "
            + ", ".join(run.final_missing)
            + "; their 'after' accuracy is that of the round before"
        )
    return notes


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return "-"


def _fmt_acc(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def report_tables(report: dict) -> tuple[Table, Table]:
    agents = Table(title="accuracy on each agent's own test split")
    for col in ("agent", "before", "after", "change"):
        agents.add_column(col, justify="left" if col == "agent" else "right")
    for aid, a in report["agents"].items():
        b, f = a["accuracy_before"], a["accuracy_after"]
        delta = "-" if b is None or f is None else f"{100 * (f - b):+.1f}"
        agents.add_row(aid, _fmt_acc(b), _fmt_acc(f), delta)
    agents.add_row(
        "mean",
        _fmt_acc(report["mean_accuracy_before"]),
        _fmt_acc(report["mean_accuracy_after"]),
        "",
        style="bold",
    )
    rounds = Table(title="rounds")
    for col in ("round", "seconds", "uplink", "downlink", "updates"):
        rounds.add_column(col, justify="right")
    total_s = sum(r["seconds"] or 0 for r in report["rounds"])
    total_up = sum(r["uplink_bytes"] or 0 for r in report["rounds"])
    total_down = sum(r["downlink_bytes"] or 0 for r in report["rounds"])
    for r in report["rounds"]:
        rounds.add_row(
            str(r["round"]),
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
            _fmt_bytes(r["uplink_bytes"]),
            _fmt_bytes(r["downlink_bytes"]),
            str(r["updates"] or "-"),
        )
    rounds.add_row("total", f"{total_s:.1f}", _fmt_bytes(total_up), _fmt_bytes(total_down), "", style="bold")
    return agents, rounds


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        f"# fedclip demo: {report['config']['strategy']}, {len(report['agents'])} agents, "
        f"{report['dataset']}",
        "",
        "| agent | before | after |",
        "|---|---:|---:|",
    ]
    for aid, a in report["agents"].items():
        lines.append(f"| {aid} | {_fmt_acc(a['accuracy_before'])} | {_fmt_acc(a['accuracy_after'])} |")
    lines.append(
        f"| **mean** | {_fmt_acc(report['mean_accuracy_before'])} | "
        f"{_fmt_acc(report['mean_accuracy_after'])} |"
    )
    lines += ["", "| round | seconds | uplink | downlink |", "|---:|---:|---:|---:|"]
    for r in report["rounds"]:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(
            f"| {r['round']} | {secs} | {_fmt_bytes(r['uplink_bytes'])} | {_fmt_bytes(r['downlink_bytes'])} |"
        )
    lines += ["", f"Total wall time {report['total_seconds']:.0f} s; run folder `{report['run_dir']}`.", ""]
    path.write_text("\n".join(lines))


def plot_accuracy(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a device or in CI
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
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
    ax.set_title(f"fedclip demo: {report['config']['strategy']} on {report['dataset']}")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
