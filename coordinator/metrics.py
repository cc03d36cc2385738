"""Per-round metrics as JSON lines, and a PNG plot of them (matplotlib, imported on demand)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedclip.sdk.errors import ConfigError
from fedclip.sdk.messages import FLEET_GAIN, FLEET_GAIN_HELPED, FLEET_GAIN_HURT

METRICS_FILE = "metrics.jsonl"


def weighted_means(
    per_agent: Mapping[str, Mapping[str, float]], samples: Mapping[str, int]
) -> dict[str, float]:
    """Sample-weighted mean of every metric name over the agents that reported it."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for agent, metrics in per_agent.items():
        w = float(max(samples.get(agent, 0), 0)) or 1e-12  # zero-sample agents still count a little
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + w * float(value)
            weights[name] = weights.get(name, 0.0) + w
    return {k: sums[k] / weights[k] for k in sorted(sums)}


def headline(name: str) -> bool:
    """The metrics worth a glance, which `status` lists per agent and `plot` draws by default:
    accuracies, losses and the fleet gain."""
    return "acc" in name or "loss" in name or name == FLEET_GAIN


def fleet_gain_shares(per_agent: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """`FLEET_GAIN_HELPED` and `FLEET_GAIN_HURT`: of the agents whose update reports a fleet gain, the
    shares for which the fleet's adapter scored above and below the one the agent had trained (the
    rest: level; none report: nothing)."""
    gains = [m[FLEET_GAIN] for m in per_agent.values() if FLEET_GAIN in m]
    if not gains:
        return {}
    return {FLEET_GAIN_HELPED: sum(g > 0 for g in gains) / len(gains),
            FLEET_GAIN_HURT: sum(g < 0 for g in gains) / len(gains)}  # fmt: skip


def fleet_gain_warning(rnd: int, metrics: Mapping[str, float], personalized: bool) -> str | None:
    """One line for the serve log when the adapter the fleet sent for round `rnd` scored below what
    its agents had trained themselves (`fleet_gain` < 0, more agents hurt than helped), else None."""
    gain, helped, hurt = (metrics.get(k) for k in (FLEET_GAIN, FLEET_GAIN_HELPED, FLEET_GAIN_HURT))
    if gain is None or helped is None or hurt is None or gain >= 0 or hurt <= helped:
        return None
    hint = "" if personalized else (
        "; a personalized strategy (fleet-lora, ce-lora) hands each device back its own fit "
        "(docs/aggregation.md)"
    )  # fmt: skip
    return (
        f"round {rnd}: the adapter the fleet sent scored {100 * -gain:.1f} points below what the agents "
        f"had trained themselves (it helped {helped:.0%} of them and cost {hurt:.0%}){hint}"
    )


class MetricsLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def append(self, record: Mapping[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        out = []
        for line in self.path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a torn last line after a crash
        return out


def plot(records: Sequence[Mapping[str, Any]], out: str | Path, names: Sequence[str] | None = None) -> Path:
    """One panel per metric (e.g. accuracy, loss): the fleet's weighted mean and each agent per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in records if r.get("state") == "aggregated"]
    if not done:
        raise ConfigError("metrics: no aggregated round to plot yet")
    all_names = sorted({k for r in done for k in r.get("metrics", {})})
    if names is None:
        names = [n for n in all_names if headline(n)] or all_names
    names = list(names)[:8]
    if not names:
        raise ConfigError("metrics: the rounds carry no metrics to plot")
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        agents = sorted({a for r in done for a, m in r.get("agents", {}).items() if name in m})
        for a in agents[:30]:  # beyond that the per-agent lines are noise; the mean still shows
            pts = [(r["round"], r["agents"][a][name]) for r in done if name in r.get("agents", {}).get(a, {})]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=0.8, alpha=0.5, marker=".")
        pts = [(r["round"], r["metrics"][name]) for r in done if name in r.get("metrics", {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "k-", lw=2, marker="o", label="fleet (weighted)")
        if name == FLEET_GAIN:  # above the line the fleet's adapter beat the device's own
            ax.axhline(0.0, color="#c62828", lw=0.8, ls="--")
        ax.set_title(name)
        ax.set_xlabel("round")
        ax.legend(loc="best", fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
