"""Issue 13: does the fleet gain (docs/agent.md) say what the benchmark says? Real-path runs.

    nice -n 5 python benchmarks/fmnist_fl_regimes.py --base-steps 40 --work /tmp/rw --lam 1 --tau 0.1 \\
        --local-epochs 3 --regime clustered --agents 9 --per-agent 32 --beta 0.5 --seeds 0 1 2 \\
        --methods local-lora fleet-lora-bsm fedavg-lora-both-bsm --out /tmp/real/clustered9x32_b40.json
    python benchmarks/fmnist_fleet_gain_report.py RUN.json ...   # -> results/fmnist_fleet_gain.*

The benchmark answers "does joining the fleet beat training alone?" with a local-only run beside the
fleet (own minus local-only, after the last round). A fleet operator has only what the agents send:
each round's `fleet_gain`, the adapter the fleet sent each agent scored on its held-out split against
the one the agent had trained the round before, and `fleet_gain_helped` / `fleet_gain_hurt`, the
shares of agents it helped and cost (the coordinator's round metrics, which `fmnist_fl_regimes.py`
keeps as `agent_metrics_per_round`). For each run and federated method: both, side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import write_md_json  # noqa: E402
from _plots import panel_grid  # noqa: E402
from fmnist_regimes_report import _paired, _real_means  # noqa: E402

from fedclip.sdk.messages import FLEET_GAIN, FLEET_GAIN_HELPED, FLEET_GAIN_HURT  # noqa: E402

LOCAL = "local-lora"


def gains(run: dict, method: str, key: str = FLEET_GAIN) -> np.ndarray:
    """[seed, round] of a round metric (NaN where a round has none: the first)."""
    rows = []
    for res in run["results"].values():
        per_round = (res.get(method) or {}).get("agent_metrics_per_round") or []
        rows.append([m.get(key, np.nan) for m in per_round])
    return np.array(rows, dtype=float)


def methods(run: dict) -> list[str]:
    first = next(iter(run["results"].values()))
    return [m for m, r in first.items() if isinstance(r, dict) and r.get("agent_metrics_per_round")]


def section(name: str, run: dict) -> list[str]:
    out = [f"### {name}", "", f"`{run['command']}` ({run['seconds'] / 60:.1f} min)", "",
           "| method | own - local-only (points, after the last round) | fleet gain, mean of rounds 2+ "
           "(points) | per round | agents helped / hurt, mean of rounds 2+ |",
           "|---|---:|---:|---|---:|"]  # fmt: skip
    local = _real_means(run, LOCAL)[0]
    for m in methods(run):
        own, sd = _paired(_real_means(run, m)[0], local)
        g = 100 * gains(run, m)[:, 1:]
        helped, hurt = (np.nanmean(gains(run, m, k)[:, 1:]) for k in (FLEET_GAIN_HELPED, FLEET_GAIN_HURT))
        per_round = " / ".join(f"{v:+.1f}" for v in np.nanmean(g, axis=0))
        spread = np.nanstd(np.nanmean(g, axis=1))  # over seeds
        out.append(f"| {m} | {own:+.1f} ± {sd:.1f} | {np.nanmean(g):+.1f} ± {spread:.1f} | {per_round} "
                   f"| {helped:.0%} / {hurt:.0%} |")  # fmt: skip
    return [*out, ""]


def plot(runs: dict, path: Path) -> None:
    plt, fig, axes = panel_grid(len(runs), 2, 5.0, 3.4)
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        for m in methods(run):
            g = 100 * np.nanmean(gains(run, m)[:, 1:], axis=0)  # round 1 has no gain
            ax.plot(range(2, len(g) + 2), g, marker="o", label=m)
        ax.set_xticks(range(2, int(run["protocol"]["rounds"]) + 1))
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("round")
        ax.set_ylabel("fleet gain (points, mean over seeds)", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("the fleet's adapter against each device's own of the round before", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    paths = [Path(p) for p in sys.argv[1:]]
    if not paths:
        raise SystemExit("usage: fmnist_fleet_gain_report.py RUN.json ...")
    runs = {p.stem: json.loads(p.read_text()) for p in paths}
    out = HERE / "results"
    title = "FMNIST-FL: the fleet gain against own minus local-only, through the real path"
    lines = [f"# {title}", "", (__doc__ or "").split("\n\n", 1)[1].strip("\n"), "",
             f"![{title}](fmnist_fleet_gain.png)", "", "## Every run", ""]  # fmt: skip
    for name, run in runs.items():
        lines += section(name, run)
    plot(runs, out / "fmnist_fleet_gain.png")
    write_md_json(out, "fmnist_fleet_gain", lines, runs)
    print(f"report: {out / 'fmnist_fleet_gain.md'}")


if __name__ == "__main__":
    main()
