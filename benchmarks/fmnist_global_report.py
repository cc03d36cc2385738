"""Writes results/fmnist_global_ceiling.{md,json,png} from one `fmnist_global_ceiling.py` run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from fmnist_global_ceiling import FEDERATED, GRID, REFERENCE, SETTINGS

TARGET = 10.0  # points over zero-shot (issue 13)


def _pct(vals) -> str:
    return f"{np.mean(vals) * 100:.1f} ± {np.std(vals) * 100:.1f}"


def best_cell(runs: list[dict], column: str) -> tuple[str, list[float]]:
    """The grid cell with the best mean over seeds (chosen on the test set: an optimistic ceiling)."""
    cells = runs[0][column]
    best = max(cells, key=lambda c: np.mean([r[column][c] for r in runs]))
    return best, [r[column][best] for r in runs]


def setting_rows(runs: list[dict], grid=GRID, federated=FEDERATED) -> list[tuple[str, str, list[float]]]:
    """(row, how, per-seed accuracies) for one setting: zero-shot, the best cell of each `grid`
    column (an oracle), each `federated` run after its last round and at its best round."""
    rows = [("zero-shot", "the pretrained base", [r["zero-shot"] for r in runs])]
    for column, _, _ in grid:
        cell, vals = best_cell(runs, column)
        rows.append((column + " (oracle)", f"lr x epochs {cell}, best of the grid", vals))
    for name in federated:
        rows.append((name, "after the last round", [r[name][-1] for r in runs]))
        rows.append((name + ", best round", "the best round (mean over seeds)", _best_round(runs, name)))
    return rows


def _best_round(runs: list[dict], name: str) -> list[float]:
    curve = np.mean([r[name] for r in runs], axis=0)
    k = int(np.argmax(curve))
    return [r[name][k] for r in runs]


def write_report(path: Path, out: Path) -> None:
    doc = json.loads(path.read_text())
    seeds = list(doc["results"])
    p = doc["protocol"]
    (out / "fmnist_global_ceiling.json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# FMNIST-FL: how far a global model can get (issue 13's 20-round target)",
        "",
        f"`{doc['command']}` ({doc['seconds'] / 60:.0f} min; seeds {', '.join(seeds)})",
        *([f"`{doc['reference_command']}` (the reference rows)"] if "reference_command" in doc else []),
        f"`python benchmarks/fmnist_global_ceiling.py --report {path.name}`",
        "",
        f"Today's fleet: {p['agents']} agents x {p['per_agent']} images (80% train), Dirichlet"
        f" {p['beta']}, fedclip-tiny pretrained as in `fmnist_fl.md`. The target: FedAvg-LoRA's global"
        f" model on the balanced unshifted test set (300 images) >= zero-shot + {TARGET:.0f} points after"
        f" {p['rounds']} rounds, within 2 points of full-FT FedAvg. The oracle rows train one model"
        " centrally on every agent's images (each the best cell of an lr x epochs grid, chosen on the"
        " test set itself, so optimistic); the grid is coarse, and a federated run's best round can beat"
        " it, so the target is checked against the best row of all. The reference rows (no shift) train"
        " on every training image of the pool instead: 7,000, balanced, unshifted, 3x the fleet's"
        " images without its label skew, what this base and adapter can reach at all. `cameras`: every"
        " training image carries its agent's camera shift (the benchmark's fleets); `no shift`: the same"
        " images and label mixes without (FLoRA's protocol). Federated rows: "
        f"{p['rounds']} rounds x {p['local_epochs']} local epoch, LoRA lr {p['lr']:g}, full FT lr"
        f" {p['fullft_lr']:g}. Mean ± sd over seeds.",
        "",
    ]
    for setting, _ in SETTINGS:
        runs = [doc["results"][s][setting] for s in seeds]
        zs = np.array([r["zero-shot"] for r in runs])
        lines += [
            f"## {setting}",
            "",
            "| row | global (%) | - zero-shot (points) | how |",
            "|---|---:|---:|---|",
        ]
        rows = setting_rows(runs)
        if setting == "no shift" and "reference" in doc:
            refs = [doc["reference"][s] for s in seeds]
            for column, _, _ in REFERENCE:
                cell, vals = best_cell(refs, column)
                how = f"lr x epochs {cell}, on all {refs[0]['images']:,} balanced pool images"
                rows.append((f"{column} on every pool image (reference)", how, vals))
        for row, how, vals in rows:
            d = (np.array(vals) - zs) * 100
            lines.append(f"| {row} | {_pct(vals)} | {d.mean():+.1f} ± {d.std():.1f} | {how} |")
        # the best of everything measured: every oracle cell and every round of every federated run
        oracle = max(np.mean(vals) for row, _, vals in rows if row != "zero-shot") - zs.mean()
        fed = np.mean([r["fedavg-lora-bsm"][-1] for r in runs]) - zs.mean()
        full = np.mean([r["full-ft-fedavg"][-1] for r in runs])
        ce, bsm = (np.mean([r[n][-1] for r in runs]) for n in ("fedavg-lora", "fedavg-lora-bsm"))
        lines += [
            "",
            f"- The best row: {oracle * 100:+.1f} points over zero-shot: the +{TARGET:.0f} target is"
            + (" within reach." if oracle * 100 >= TARGET else " above every global model measured."),
            f"- FedAvg-LoRA (balanced softmax) after {p['rounds']} rounds: {fed * 100:+.1f} points;"
            f" FedAvg-LoRA - full-FT FedAvg: {(bsm - full) * 100:+.1f} points with balanced softmax,"
            f" {(ce - full) * 100:+.1f} with plain CE (target >= -2).",
            "",
            "Global accuracy per round (mean over seeds, %):",
            "",
            "| method | " + " | ".join(str(k) for k in range(0, p["rounds"] + 1, 5)) + " |",
            "|---|" + "---:|" * len(range(0, p["rounds"] + 1, 5)),
        ]
        for name in FEDERATED:
            curve = np.mean([r[name] for r in runs], axis=0) * 100
            lines.append(
                f"| {name} | " + " | ".join(f"{curve[k]:.1f}" for k in range(0, p["rounds"] + 1, 5)) + " |"
            )
        lines.append("")
    lines += ["![global accuracy per round](fmnist_global_ceiling.png)", ""]
    (out / "fmnist_global_ceiling.md").write_text("\n".join(lines))
    plot(doc, out / "fmnist_global_ceiling.png")
    print(f"report: {out / 'fmnist_global_ceiling.md'}")


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(doc["results"])
    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(11, 4.8), sharey=True)
    for ax, (setting, _) in zip(axes, SETTINGS, strict=True):
        runs = [doc["results"][s][setting] for s in seeds]
        zs = np.mean([r["zero-shot"] for r in runs]) * 100
        for name in FEDERATED:
            curve = np.mean([r[name] for r in runs], axis=0) * 100
            ax.plot(range(len(curve)), curve, marker=".", label=name)
        for column, _, _ in GRID:
            ax.axhline(np.mean(best_cell(runs, column)[1]) * 100, ls=":", lw=1, label=column + " (oracle)",
                       color={"pooled LoRA": "C0", "pooled full FT": "C2"}.get(column, "C1"))  # fmt: skip
        if setting == "no shift" and "reference" in doc:
            refs = [doc["reference"][s] for s in seeds]
            for column, _, _ in REFERENCE:
                level = np.mean(best_cell(refs, column)[1]) * 100
                ax.axhline(level, ls="-.", lw=1, color="C4" if "LoRA" in column else "C5",
                           label=f"{column} on every pool image (reference)")  # fmt: skip
        ax.axhline(zs, color="grey", lw=1, label="zero-shot")
        ax.axhline(zs + TARGET, color="red", ls="--", lw=1, label=f"target: zero-shot + {TARGET:.0f}")
        ax.set_title(f"{setting}")
        ax.set_xlabel("round")
    axes[0].set_ylabel("global model, balanced unshifted test (%)")
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
