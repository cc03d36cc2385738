"""Report of the FMNIST-FL regimes (`fmnist_sim.py` runs): tables, targets of issue 13, plots.

    python benchmarks/fmnist_regimes_report.py RUN.json [RUN.json ...] [--real REAL.json ...]

Writes `results/fmnist_regimes.json` (the runs, as given: `sim` from `fmnist_sim.py`, `real` from
`fmnist_fl_regimes.py`), `results/fmnist_regimes.<run>.png` (per run:
own vs all-class accuracy per method, and both per round) and the regimes section of
`results/fmnist_fl.md` (everything after its REGIMES_MARKER line is replaced).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REGIMES_MARKER = "<!-- regimes: written by fmnist_regimes_report.py -->"
ORDER = (
    "zero-shot", "local-lora", "local-core", "fedavg-lora", "fedavg-lora-both", "full-ft-fedavg", "ce-lora",
    "fleet-core", "fleet-core-r6", "fleet-core-r6-bsm", "fleet-core-r7", "fleet-core-r7-bsm", "fleet-lora",
    "fleet-lora-bsm", "fedavg-lora-both-bsm", "fedavg-lora-both-bsm-personal",
)  # fmt: skip
CORES = ("fleet-core-r6", "fleet-core-r7")  # fleet-core over a rank-6 / rank-7 basis (session 12)
PERSONALS = ("fleet-lora", "fleet-core", *CORES)  # the methods issue 13's targets are checked for
REAL_PERSONALS = (
    "fleet-lora", "fleet-lora-bsm", *(c + b for c in CORES for b in ("", "-bsm")),
    "fedavg-lora-both-bsm-personal",  # FedAvg-LoRA (balanced softmax) + personal tuning on each device
)  # fmt: skip
# no fleet-trained global adapter
NO_GLOBAL = ("local-lora", "local-core", "ce-lora", "fleet-core", *CORES, "fleet-lora")
_CORE_MIX = "(1 - h) C_i + h Cbar (final cores; exact adapter mixing over the frozen basis)"
MIX_TEXT = {
    "fleet-core": _CORE_MIX,
    **dict.fromkeys(CORES, _CORE_MIX),
    "fleet-lora": "(1 - h) logits_i + h logits_fleet (the personal and the fleet-mean adapter, two passes)",
}


def _seed_means(run: dict, method: str, key: str, at: int = -1) -> list[float]:
    """Per seed: the mean over agents of the accuracy at round index `at`."""
    out = []
    for res in run["results"].values():
        r = res.get(method)
        if r is not None and r[key]:
            out.append(float(np.mean([v[at] for v in r[key].values()])))
    return out


def _global(run: dict, method: str) -> list[float]:
    return [float(res[method]["global_"][-1]) for res in run["results"].values() if method in res]


def _fmt(vals: list[float]) -> str:
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{100 * vals[0]:.1f}"
    return f"{100 * np.mean(vals):.1f} ± {100 * np.std(vals):.1f}"


def _m(vals: list[float]) -> float:
    return float(np.mean(vals)) if vals else float("nan")


def _cold(run: dict) -> dict[str, list[float]]:
    """Mean over newcomers per seed: on joining, after one local round, local-only on its images."""
    out: dict[str, list[float]] = {}
    for res in run["results"].values():
        for method, r in res.items():
            if not isinstance(r, dict):
                continue
            for key, vals in _cold_entries(r.get("cold_start", {})).items():
                out.setdefault(f"{method}:{key}", []).append(float(np.mean(vals)))
    return out


def _cold_entries(cold: dict) -> dict[str, list[float]]:
    per: dict[str, list[float]] = {}
    for entry in cold.values():
        for key, (own, _all) in entry.items():
            per.setdefault(key, []).append(own)
    return per


def _lora_g(p: dict) -> str:
    g = p.get("lora_fleet_weight")
    return "0 (its default)" if g is None else str(g)


def run_section(name: str, run: dict) -> list[str]:
    p = run["protocol"]
    methods = [m for m in ORDER if any(m in r for r in run["results"].values())]
    seeds = sorted(run["results"], key=int)
    lines = [
        f"### {name}",
        "",
        _commands(run),
        "",
        f"{p['regime']}: {p['agents']} agents, {p['per_agent']} labelled images each"
        f"{' (80% train)' if p['regime'] == 'today' else ''}, Dirichlet {p['beta']}, {p['rounds']} rounds x "
        f"{p['local_epochs']} local epoch(s), lr {p['lr']} (cores x{p['core_lr_scale']}), rank {p['rank']}, "
        f"lam {p['lam']}, tau {p['tau']}, fleet weight g: fleet-core {p['fleet_weight']}, fleet-lora "
        f"{_lora_g(p)}; seeds {', '.join(seeds)} "
        f"({len(seeds)}; mean ± sd over seeds of the mean over agents).",
        "",
        "| method | own (%) | all-class (%) | worst agent own (%) | global, balanced unshifted (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for m in methods:
        worst = [min(v[-1] for v in res[m]["own"].values()) for res in run["results"].values() if m in res]
        glob = _global(run, m) if m not in NO_GLOBAL else []
        lines.append(
            f"| {m} | {_fmt(_seed_means(run, m, 'own'))} | {_fmt(_seed_means(run, m, 'all'))} | "
            f"{_fmt(worst)} | {_fmt(glob)} |"
        )
    lines.append("")
    lines += _targets(run, methods)
    for pm in PERSONALS:
        mixes = [r[pm]["inference_mix"] for r in run["results"].values() if "inference_mix" in r.get(pm, {})]
        if not mixes:
            continue
        text = f"{pm} mixed at inference: each agent runs {MIX_TEXT[pm]}; h = 0 is the table's row, h = 1"
        lines += [
            "",
            text + " the fleet mean alone.",
            "",
            "| h | own (%) | all-class (%) |",
            "|---:|---:|---:|",
        ]
        for h in mixes[0]:
            lines.append(
                f"| {h} | {_fmt([x[h]['own'] for x in mixes])} | {_fmt([x[h]['all'] for x in mixes])} |"
            )
    cold = _cold(run)
    if any(k.startswith(pm) for pm in PERSONALS for k in cold):
        lines += [
            "",
            "Cold start (newcomers with 16 labelled images join after the last round; own accuracy):",
            "",
            "| method | on joining (%) | after one local round (%) |",
            "|---|---:|---:|",
        ]
        for m in methods:
            join, after = cold.get(f"{m}:on_join", []), cold.get(f"{m}:after_one_round", [])
            local = cold.get(f"{m}:after_local", [])
            if local:
                lines.append(
                    f"| {m} (alone, {p['rounds'] * p['local_epochs']} epochs on its 16) | - | {_fmt(local)} |"
                )
            elif join:
                lines.append(f"| {m} | {_fmt(join)} | {_fmt(after)} |")
    lines += ["", f"![{name}](fmnist_regimes.{name}.png)", ""]
    return lines


def _commands(run: dict) -> str:
    """The run's command, and those of methods run later on the same fleets and merged in (one per
    line: markdown line breaks)."""
    cmds = ([run["command"]] if run.get("command") else []) + run.get("extra_commands", [])
    return "  \n".join(f"`{c}`" for c in cmds)


def _paired(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean and sd over seeds of the per-seed difference a - b, in points."""
    d = 100 * (np.asarray(a) - np.asarray(b))
    return float(d.mean()), float(d.std())


def target_rows(run: dict) -> list[tuple[str, float, float, float]]:
    """(target, measured points, sd over seeds of the paired difference, required) of issue 13."""
    methods = [m for m in ORDER if any(m in r for r in run["results"].values())]
    own = {m: _seed_means(run, m, "own") for m in methods}
    alls = {m: _seed_means(run, m, "all") for m in methods}
    rows = []
    for pm in (m for m in PERSONALS if m in methods):
        if run["protocol"]["regime"] in ("scarce", "clustered"):
            for base in ("local-lora", "local-core", "fedavg-lora"):
                if base in own:
                    rows.append((f"own: {pm} - {base}", *_paired(own[pm], own[base]), 5.0))
        refs = [(_m(alls[m]), m) for m in ("zero-shot", "fedavg-lora") if m in alls]
        if refs:
            ref = max(refs)[1]
            rows.append((f"all-class: {pm} - {ref} (better of zero-shot, FedAvg-LoRA)",
                         *_paired(alls[pm], alls[ref]), -2.0))  # fmt: skip
        cold = _cold(run)
        if f"{pm}:on_join" in cold and "local-lora:after_local" in cold:
            gain = _paired(cold[f"{pm}:on_join"], cold["local-lora:after_local"])
            rows.append((f"cold start: {pm} on joining - local-only on its 16 images", *gain, 5.0))
    if "fedavg-lora" in methods and "zero-shot" in methods and "full-ft-fedavg" in methods:
        fl, zs, ft = (_global(run, m) for m in ("fedavg-lora", "zero-shot", "full-ft-fedavg"))
        rows.append(("global (balanced, unshifted): FedAvg-LoRA - zero-shot", *_paired(fl, zs), 10.0))
        rows.append(("global (balanced, unshifted): FedAvg-LoRA - full-FT FedAvg", *_paired(fl, ft), -2.0))
    return rows


def _targets(run: dict, methods: list[str]) -> list[str]:
    rows = target_rows(run)
    if not rows:
        return []
    out = ["Targets of issue 13 (means over agents and seeds):", ""]
    for name, got, sd, need in rows:
        met = "met" if got >= need else "missed"
        out.append(f"- {name}: {got:+.1f} ± {sd:.1f} points (target >= {need:+.0f}): **{met}**")
    return out


# ---- real-path runs (fmnist_fl_regimes.py) ---------------------------------------------------------
def _real_means(run: dict, method: str) -> tuple[list[float], list[float]]:
    """Per seed: (own after the last round, all-class of the final adapter), means over agents."""
    own, alls = [], []
    for res in run["results"].values():
        r = res.get(method)
        if r is None:
            continue
        own.append(float(np.mean([v[-1] for v in r["accuracy_per_round"].values()])))
        alls.append(float(np.mean(list(r["all_class"].values()))))
    return own, alls


def _real_bytes(run: dict, method: str) -> list[float]:
    out = []
    for res in run["results"].values():
        r = res.get(method, {})
        up, down = r.get("uplink_bytes_per_round") or [], r.get("downlink_bytes_per_round") or []
        per = [(u or 0) + (d or 0) for u, d in zip(up, down, strict=False)]
        if per:
            out.append(float(np.mean(per)))
    return out


def real_rows(run: dict) -> list[tuple[str, float, float, float]]:
    own = {m: _real_means(run, m)[0] for m in ORDER}
    alls = {m: _real_means(run, m)[1] for m in ORDER}
    rows = []
    for pm in REAL_PERSONALS:
        if not own.get(pm):
            continue
        for base in ("local-lora", "fedavg-lora-both"):
            if own.get(base):
                rows.append((f"own: {pm} - {base}", *_paired(own[pm], own[base]), 5.0))
        refs = [(_m(alls[m]), m) for m in ("zero-shot", "fedavg-lora-both") if alls.get(m)]
        if refs:
            ref = max(refs)[1]
            rows.append((f"all-class: {pm} - {ref} (better of zero-shot, FedAvg-LoRA)",
                         *_paired(alls[pm], alls[ref]), -2.0))  # fmt: skip
    return rows


def real_section(name: str, run: dict, out: Path) -> list[str]:
    p = run["protocol"]
    methods = [m for m in ORDER if any(m in r for r in run["results"].values())]
    seeds = sorted(run["results"], key=int)
    scale = (
        f"{p['regime']}: {p['agents']} agents, {p['per_agent']} labelled images each (each agent holds 20% "
        f"of them out for its metrics), Dirichlet {p['beta']}, {p['rounds']} rounds x {p['local_epochs']} "
        f"local epochs, lr {p['lr']}, rank {p['rank']}, lam {p['lam']}, tau {p['tau']}; seeds "
        f"{', '.join(seeds)}. `fedclip-coord serve` and one `fedclip-agent start` process per agent over "
        "the embedded broker; accuracy by `fedclip-agent eval` on each agent's own split (100 images by its "
        "mix) and all-class set (200)."
    )
    lines = [f"### {name} (real path)", "", _commands(run), "", scale, "",
             "| method | own (%) | all-class (%) | bytes per round, all agents (up + down) |",
             "|---|---:|---:|---:|"]  # fmt: skip
    for m in methods:
        own, alls = _real_means(run, m)
        b = _real_bytes(run, m)
        lines.append(f"| {m} | {_fmt(own)} | {_fmt(alls)} | {f'{_m(b) / 1e3:,.0f} kB' if b else '-'} |")
    lines += ["", "Targets (means over agents; ± sd over seeds where more than one):", ""]
    for t, got, sd, need in real_rows(run):
        lines.append(f"- {t}: {got:+.1f} ± {sd:.1f} points (target >= {need:+.0f}): "
                     f"**{'met' if got >= need else 'missed'}**")  # fmt: skip
    lines += ["", f"![{name}](fmnist_regimes.{name}.png)", ""]
    _real_plot(name, run, methods, out / f"fmnist_regimes.{name}.png")
    return lines


def _real_plot(name: str, run: dict, methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(methods):
        own, alls = _real_means(run, m)
        ax1.plot(100 * _m(alls), 100 * _m(own), "o", color=f"C{i}", label=m)
        curves = [np.mean(list(zip(*res[m]["accuracy_per_round"].values(), strict=True)), axis=1)
                  for res in run["results"].values() if m in res]  # fmt: skip
        curve = np.mean(curves, axis=0)
        if len(curve) <= 2:  # zero-shot: one value, local-only: before and after; drawn from 0 to R
            curve = np.array([curve[0], curve[-1]])
        xs = range(len(curve)) if len(curve) > 2 else [0, run["protocol"]["rounds"]]
        ax2.plot(xs, 100 * curve, "-o", color=f"C{i}", ms=3, label=m)
    ax1.set(xlabel="all-class accuracy (%)", ylabel="own accuracy (%)")
    ax1.set_title(f"{name} (real path): own vs all-class, mean over agents", fontsize=9)
    ax2.set(xlabel="round", ylabel="own accuracy (%)")
    ax2.set_title("own accuracy per round", fontsize=9)
    for ax in (ax1, ax2):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(name: str, run: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in ORDER if any(m in r for r in run["results"].values())]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, m in enumerate(methods):
        own, alls = _seed_means(run, m, "own"), _seed_means(run, m, "all")
        c = f"C{i}"
        ax1.errorbar(100 * _m(alls), 100 * _m(own), xerr=100 * np.std(alls), yerr=100 * np.std(own), fmt="o",
                     color=c, label=m, capsize=3)  # fmt: skip
        rounds = len(next(iter(run["results"].values()))[m]["own"]["agent-00"])
        per_round_own = [_m(_seed_means(run, m, "own", r)) for r in range(rounds)]
        per_round_all = [_m(_seed_means(run, m, "all", r)) for r in range(rounds)]
        # Zero-shot is one point and local-only two (before, after all epochs): drawn from 0 to R.
        if rounds <= 2:
            per_round_own, per_round_all = (
                [per_round_own[0], per_round_own[-1]],
                [per_round_all[0], per_round_all[-1]],
            )
        xs = range(rounds) if rounds > 2 else [0, run["protocol"]["rounds"]]
        ax2.plot(xs, [100 * v for v in per_round_own], "-o", color=c, ms=3, label=f"{m} own")
        ax2.plot(xs, [100 * v for v in per_round_all], "--", color=c, label=f"{m} all-class")
    ax1.set_xlabel("all-class accuracy (%)")
    ax1.set_ylabel("own accuracy (%)")
    ax1.set_title(f"{name}: own vs all-class (mean over agents, ± sd over seeds)", fontsize=9)
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    ax2.set_xlabel("round")
    ax2.set_ylabel("accuracy (%)")
    ax2.set_title("per round: own (solid), all-class (dashed)", fontsize=9)
    ax2.legend(fontsize=6, ncol=2)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def merge(run: dict, extra: dict) -> None:
    """`extra`'s methods added to `run`, seed by seed; the fleets must be the same (same protocol)."""
    keys = ("regime", "agents", "per_agent", "beta", "rounds", "local_epochs")
    if any(run["protocol"].get(k) != extra["protocol"].get(k) for k in keys):
        raise SystemExit(f"--merge: {extra['command']} ran another fleet than {run['command']}")
    if set(extra["results"]) != set(run["results"]):
        raise SystemExit(f"--merge: {extra['command']} ran other seeds")
    for seed, res in extra["results"].items():
        run["results"][seed].update({m: v for m, v in res.items() if m != "groups"})
    run["extra_commands"] = [*run.get("extra_commands", []), extra["command"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="fmnist_sim.py result files (name = file stem)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--preamble", type=Path, default=None, help="markdown put before the run sections")
    ap.add_argument("--real", type=Path, nargs="*", default=[], help="fmnist_fl_regimes.py result files")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="results of more methods on the same fleets and seeds: each is merged into the sim "
                         "or real run of its file name (its command listed beside the run's)")  # fmt: skip
    args = ap.parse_args()
    runs = {p.stem: json.loads(p.read_text()) for p in args.runs}
    real = {p.stem: json.loads(p.read_text()) for p in args.real}
    for p in args.merge:
        merge((runs | real)[p.stem], json.loads(p.read_text()))
    (args.out / "fmnist_regimes.json").write_text(json.dumps({"sim": runs, "real": real}, indent=1))
    lines = [REGIMES_MARKER, ""]
    if args.preamble:
        lines += [args.preamble.read_text().rstrip(), ""]
    lines += ["### Targets, every run", "",
              "Measured: mean over seeds of the per-seed difference (of means over agents), ± its sd.", "",
              "| run | target | measured (points) | required | met |", "|---|---|---:|---:|---|"]  # fmt: skip
    for name, run in runs.items():
        for t, got, sd, need in target_rows(run):
            met = "yes" if got >= need else "**no**"
            lines.append(f"| {name} | {t} | {got:+.1f} ± {sd:.1f} | >= {need:+.0f} | {met} |")
    for name, run in real.items():
        for t, got, sd, need in real_rows(run):
            met = "yes" if got >= need else "**no**"
            lines.append(f"| {name} (real path) | {t} | {got:+.1f} ± {sd:.1f} | >= {need:+.0f} | {met} |")
    lines.append("")
    for name, run in real.items():
        lines += real_section(name, run, args.out)
    for name, run in runs.items():
        lines += run_section(name, run)
        plot(name, run, args.out / f"fmnist_regimes.{name}.png")
    md = args.out / "fmnist_fl.md"
    head = md.read_text().split(REGIMES_MARKER)[0].rstrip() + "\n\n" if md.is_file() else ""
    md.write_text(head + "\n".join(lines).rstrip() + "\n")
    print(f"report: {md}")


if __name__ == "__main__":
    main()
