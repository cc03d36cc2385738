"""The demo's report: one dict (report.json), a Markdown file and rich tables (the plot: `plot`).

Per agent: accuracy on its own test split and on its all-class set, for zero-shot, local-only and
the federated adapter (`comparison`); per round: seconds and bytes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path

from rich import box
from rich.table import Table
from rich.text import Text

from fedclip.coordinator.demo.base import Base
from fedclip.coordinator.demo.comparison import COLUMNS, GATED, PERSONAL, SETS, Comparison, columns
from fedclip.coordinator.demo.config import DemoConfig
from fedclip.coordinator.demo.federation import FleetRun
from fedclip.sdk.messages.rounds import FLEET_GAIN, FLEET_GAIN_HELPED, FLEET_GAIN_HURT, Hyperparameters

SET_TITLES = {"own": "own", "all_class": "all-class"}


# ---- report ------------------------------------------------------------------------------------
FLEET_GAIN_NOTE = (
    "Fleet gain: held-out accuracy of the adapter the fleet sent each agent for the round minus that of "
    "the adapter the agent trained in its last round (mean, points), and the shares of agents it helped "
    '(up) and cost (down); the rest kept every held-out answer (docs/agent.md, "Fleet gain").'
)


def _fmt_fleet_gain(r: dict) -> str:
    """`+1.2 (50% up, 0% down)`: a round's fleet gain in points and the shares of agents it helped and
    cost; `-` for none."""
    gain, up, down = r.get("fleet_gain"), r.get("fleet_gain_helped"), r.get("fleet_gain_hurt")
    if gain is None:
        return "-"
    return f"{100 * gain:+.1f}" + ("" if up is None or down is None else f" ({up:.0%} up, {down:.0%} down)")


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
    comparison: Comparison | None = None,
    base: Base | None = None,
    phases: dict[str, float] | None = None,
    notes: list[str] | None = None,
) -> dict:
    """The report as one JSON-ready dict. With `comparison`, every agent also has `own` and
    `all_class` ({zero_shot, local_only, federated} accuracies) and `mean` has their means."""
    rounds = []
    for rec in run.rounds:
        rec = {**rec, **run.costs.get(rec["round"], {})}
        metrics = rec.get("metrics", {})
        up, down = _num(rec, "uplink_bytes"), _num(rec, "downlink_bytes")
        rounds.append(
            {
                "round": rec["round"],
                "seconds": _num(rec, "seconds"),
                "uplink_bytes": up,
                "downlink_bytes": down,
                "bytes": (up or 0) + (down or 0) if up is not None or down is not None else None,
                "updates": rec.get("updates"),
                "agent_metrics": metrics,
                # the fleet's adapter against each agent's own of its last round (sdk.messages)
                "fleet_gain": _num(metrics, FLEET_GAIN),
                "fleet_gain_helped": _num(metrics, FLEET_GAIN_HELPED),
                "fleet_gain_hurt": _num(metrics, FLEET_GAIN_HURT),
            }
        )
    agents: dict[str, dict] = {
        aid: {"accuracy_before": s[0], "accuracy_after": s[-1], "accuracy_per_round": s}
        for aid, s in acc.items()
    }
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "password"}
    report: dict = {
        "config": config,
        "dataset": dataset,
        "labels": labels,
        "base": _base(base),
        "agents": agents,
        "rounds": rounds,
        "mean_accuracy_before": _mean(s[0] for s in acc.values()),
        "mean_accuracy_after": _mean(s[-1] for s in acc.values()),
    }
    if comparison is not None:
        for aid, a in agents.items():
            for name in SETS:
                a[name] = dict(comparison.table[name][aid])
            if aid in comparison.gate:
                a["open_set"] = comparison.gate[aid]
        report["mean"] = {
            name: {c: _mean(row[c] for row in comparison.table[name].values()) for c in columns(cfg)}
            for name in SETS
        }
        if comparison.gate:
            report["open_set"] = _open_set(cfg, comparison)
        report["local_only"] = {
            "epochs": cfg.rounds * cfg.local_epochs,
            "batch_size": Hyperparameters.batch_size,
            "lr": cfg.lr,
            "train_seconds": comparison.local_train_seconds,
        }
    report |= {
        "bytes_total": sum(r["bytes"] or 0 for r in rounds),
        "federation_seconds": run.seconds,
        "phase_seconds": phases or {},
        "total_seconds": wall_s,
        "run_dir": str(cfg.run_dir),
        "notes": _notes(cfg, run, base) + list(notes or []),
    }
    return report


def _mean(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _open_set(cfg: DemoConfig, comparison: Comparison) -> dict:
    """The gate's column over the fleet: the share of each set's images the gates sent away, and
    where they sent them (per agent: `Comparison.gate`)."""
    share = {}
    for name in SETS:
        sent = sum(g.get("sent_away", {}).get(name, 0) for g in comparison.gate.values())
        seen = sum(g.get("images", {}).get(name, 0) for g in comparison.gate.values())
        share[name] = sent / seen if seen else None
    # where each agent's gate sent its images: the fleet's adapter its rollout delivered, or the base
    to = Counter(str(g.get("fallback") or "") for g in comparison.gate.values())
    fallbacks = {v: n for v, n in sorted(to.items()) if v}
    return {"quantile": cfg.open_set_q, "sent_away_share": share, "fallbacks": fallbacks, "to_base": to[""]}


def open_set_line(report: dict) -> str:
    """What the gates did, in one sentence ("" without the gated column)."""
    gate = report.get("open_set")
    if not gate:
        return ""
    share = ", ".join(
        f"{100 * v:.0f}% of the {SET_TITLES[n]} images"
        for n, v in gate["sent_away_share"].items()
        if v is not None
    )
    to = [f"the fleet's adapter {v} ({_agents(n)})" for v, n in gate["fallbacks"].items()]
    to += [f"the bundle's own model ({_agents(gate['to_base'])})"] if gate["to_base"] else []
    where = " and ".join(to)
    return f"fedclip + gate (q {gate['quantile']:g}) sent {share} away from the label prior, to {where}"


def _agents(n: int) -> str:
    return f"{n} agent{'s' if n != 1 else ''}"


def _base(base: Base | None) -> dict | None:
    if base is None:
        return None
    keep = ("steps", "public_images", "seed", "cached", "seconds", "zero_shot_pool_accuracy",
            "zero_shot_eval_images")  # fmt: skip
    return {"kind": base.kind, "weights": base.weights, **{k: base.info[k] for k in keep if k in base.info}}


def _notes(cfg: DemoConfig, run: FleetRun, base: Base | None) -> list[str]:
    notes = []
    if base is None and cfg.pretrained is None and cfg.bundle is None:
        notes.append(f"{cfg.model} has random weights (no --pretrained): accuracies start near chance")
    elif base is not None and base.note:
        notes.append(base.note)
    if cfg.open_set_q > 0 and not cfg.gated:
        notes.append(
            f"agents trained with {cfg.loss}: no adapter carries a label prior, so there is no open-set "
            "gate to score (the fedclip + gate column needs balanced softmax)"
        )
    if cfg.loss == "balanced-softmax":
        notes.append(
            "agents trained with balanced softmax: fedclip's accuracies add each agent's label prior "
            "at inference (weight 1), as its Classifier does; local-only trains plain CE"
        )
    if run.final_missing:
        notes.append(
            "the last round's adapter did not reach "
            + ", ".join(run.final_missing)
            + "; their 'after' accuracy is that of the round before"
        )
    return notes


# ---- formatting ----------------------------------------------------------------------------------
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


def column_names(report: dict) -> dict[str, str]:
    """How the columns are called in tables and plots (titles name the federated one's strategy)."""
    return {
        "zero_shot": "zero-shot",
        "local_only": "local-only",
        "federated": "fedclip",
        GATED: "fedclip + gate",
        PERSONAL: "personal",
    }


def report_columns(report: dict) -> tuple[str, ...]:
    """The comparison's columns (`comparison.columns`), read back from a report."""
    return tuple(report["mean"][SETS[0]]) if "mean" in report else COLUMNS


def _columns(report: dict) -> list[tuple[str, str, str]]:
    """(set, column, header) of the accuracy table; a report without a comparison: own before/after."""
    if "mean" not in report:
        return [("own", "zero_shot", "before"), ("own", "federated", "after")]
    names = column_names(report)
    return [(s, c, f"{SET_TITLES[s]}: {names[c]}") for s in SETS for c in report_columns(report)]


def _cell(agent: dict, name: str, column: str) -> float | None:
    if name in agent:
        return agent[name][column]
    return agent["accuracy_before" if column == "zero_shot" else "accuracy_after"]


def _mean_row(report: dict) -> dict:
    if "mean" in report:
        return report["mean"]
    return {"own": {"zero_shot": report["mean_accuracy_before"], "federated": report["mean_accuracy_after"]}}


def gain_line(report: dict) -> str:
    """The mean gain of the federated adapter over training alone, on both sets ("" without one)."""
    mean = report.get("mean")
    if not mean:
        return ""
    lines = []
    config = report.get("config", {})
    mu, q = config.get("personal_mu") or 0, config.get("open_set_q") or 0
    titles = (
        ("federated", "fedclip"),
        (GATED, f"fedclip + gate (q {q:g})"),
        (PERSONAL, f"fedclip + personal tuning (mu {mu:g})"),
    )
    for column, title in titles:
        parts = []
        for name in SETS:
            got, local = mean[name].get(column), mean[name]["local_only"]
            if got is not None and local is not None:
                gain = round(100 * (got - local), 1) + 0.0  # + 0.0: a gain that rounds to 0 is not "-0.0"
                parts.append(f"{SET_TITLES[name]} {gain:+.1f}")
        if parts:
            lines.append(f"{title} minus local-only (mean, points): {', '.join(parts)}")
    return "\n".join(lines)


def report_tables(report: dict) -> tuple[Table | Text, ...]:
    """The accuracy per agent, one table per test set (so that up to six columns fit in 80: the report
    also goes to logs and CI output), the gains over local-only and what the gates did (lines as
    wide as the terminal, not the tables), and the rounds table."""
    columns = _columns(report)
    mean = _mean_row(report)
    sets = [n for n in SETS if any(c[0] == n for c in columns)]
    tables: list[Table | Text] = []
    for name in sets:
        shown = [(n, c, h) for n, c, h in columns if n == name]
        title = (
            f"own test split (fedclip = {report['config']['strategy']})"
            if name == "own"
            else "all-class set (every label, under the agent's camera)"
        )
        table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        table.add_column("agent")
        for _, _, header in shown:
            table.add_column(header.split(": ", 1)[-1], justify="right")
        for aid, a in report["agents"].items():
            table.add_row(aid, *(_fmt_acc(_cell(a, n, c)) for n, c, _ in shown))
        table.add_row("mean", *(_fmt_acc(mean[n][c]) for n, c, _ in shown), style="bold")
        tables.append(table)
    said = "\n".join(filter(None, (gain_line(report), open_set_line(report))))
    if said:
        tables.append(Text(said + "\n"))
    rounds = Table(title="rounds")
    for col in ("round", "seconds", "uplink", "downlink", "updates", "fleet gain"):
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
            _fmt_fleet_gain(r),
        )
    totals = ("total", f"{total_s:.1f}", _fmt_bytes(total_up), _fmt_bytes(total_down), "", "")
    rounds.add_row(*totals, style="bold")
    return (*tables, rounds)


def write_markdown(report: dict, path: Path) -> None:
    columns = _columns(report)
    lines = [
        f"# fedclip demo: {report['config']['strategy']}, {len(report['agents'])} agents, "
        f"{report['dataset']}",
        "",
        f"Accuracy on each agent's own test split (own) and on its all-class set (every label in equal "
        f"numbers, under the agent's camera); fedclip = {report['config']['strategy']}.",
        "",
        "| agent | " + " | ".join(h for _, _, h in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for aid, a in report["agents"].items():
        lines.append(f"| {aid} | " + " | ".join(_fmt_acc(_cell(a, n, c)) for n, c, _ in columns) + " |")
    mean = _mean_row(report)
    lines.append("| **mean** | " + " | ".join(_fmt_acc(mean[n][c]) for n, c, _ in columns) + " |")
    gains, gates = gain_line(report), open_set_line(report)
    if gains:
        lines += ["", *(f"{line}." for line in gains.splitlines())]
    if gates:
        lines += ["", f"{gates} (`serve-inference --open-set`, docs/inference.md)."]
    lines += ["", "| round | seconds | uplink | downlink | fleet gain |", "|---:|---:|---:|---:|---:|"]
    for r in report["rounds"]:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.1f}"
        up, down = _fmt_bytes(r["uplink_bytes"]), _fmt_bytes(r["downlink_bytes"])
        lines.append(f"| {r['round']} | {secs} | {up} | {down} | {_fmt_fleet_gain(r)} |")
    if any(r["fleet_gain"] is not None for r in report["rounds"]):
        lines += ["", FLEET_GAIN_NOTE]
    lines += ["", f"Total wall time {report['total_seconds']:.0f} s; run folder `{report['run_dir']}`."]
    lines += [f"Note: {n}." for n in report["notes"]] + [""]
    path.write_text("\n".join(lines))
