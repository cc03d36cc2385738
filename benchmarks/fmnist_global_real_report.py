"""The 20-round global target through the real path: FedAvg-LoRA's global model on the balanced set.

    python benchmarks/fmnist_fl_regimes.py --regime today --agents 10 --per-agent 300 --beta 0.1 \
        --rounds 20 --no-shift --base-steps 40 --seeds 0 1 2 \
        --methods zero-shot fedavg-lora-both fedavg-lora-both-bsm --out /tmp/g40.json
    python benchmarks/fmnist_global_real_report.py 40=/tmp/g40.json [300=/tmp/g300.json]
        # -> results/fmnist_global_real.{md,json,png}; with no runs: from the committed json

`fmnist_base_room.md` measured the target in-process (`fmnist_sim`'s agents in one process); this runs
the same fleets (today's: 10 agents x 300 images, Dirichlet 0.1, no camera shift, the seeds each section
names, image for image) through `fedclip-coord serve`, one `fedclip-agent start` process per agent and
the embedded broker, and scores the adapter every agent installed after rounds 5, 10, 15 and 20 on the
same 300 balanced unshifted images. Full-FT FedAvg is not a product path: its rows are the in-process
ones of `fmnist_base_room.json` (every lr it tried, the best kept as the bar), on the same fleets.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from fmnist_regimes_report import _fmt as _pct  # noqa: E402  # "mean ± sd" of fractions, in %
from fmnist_reset_report import _fmt as _signed  # noqa: E402  # "+mean ± sd" of a (mean, sd) pair
from matplotlib.ticker import MaxNLocator  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "fmnist_global_real"
ROOM = RESULTS / "fmnist_base_room.json"  # the in-process runs on the same fleets
FULL_FT_BYTES = RESULTS / "fmnist_fl.json"  # full FT's bytes a round for 10 fedclip-tiny agents
REAL = ("fedavg-lora-both", "fedavg-lora-both-bsm")
IN_PROCESS = ("fedavg-lora-bsm", "full-ft-fedavg", "full-ft-fedavg lr 0.0003", "full-ft-fedavg lr 0.001")
ZS_GAIN, FT_GAP, BYTES_RATIO = 10.0, 2.0, 100.0  # issue 13's global targets


def _global(run: dict, seed: str, method: str) -> dict[int, float]:
    res = run["results"][seed].get(method, {}).get("global_per_round", {})
    return {int(r): v["accuracy"] for r, v in res.items()}


def _installed(run: dict, seed: str, method: str) -> list[dict]:
    return list(run["results"][seed][method]["global_per_round"].values())


def _bytes_total(run: dict, seed: str, method: str) -> float:
    res = run["results"][seed][method]
    return float(sum(res["uplink_bytes_per_round"]) + sum(res["downlink_bytes_per_round"]))


def summarize(base: str, run: dict, room: dict, full_ft_round_bytes: float) -> dict:
    """Per method: the global accuracy after the last round per seed, minus zero-shot, by round."""
    seeds = sorted(run["results"], key=int)
    rounds = run["protocol"]["rounds"]
    zs = {s: _global(run, s, "zero-shot")[0] for s in seeds}
    out: dict = {"seeds": seeds, "rounds": rounds, "agents": run["protocol"]["agents"], "zero_shot": zs,
                 "real": {}, "in_process": {}}  # fmt: skip
    for m in REAL:
        if not all(_global(run, s, m) for s in seeds):
            continue
        by_round = {s: _global(run, s, m) for s in seeds}
        out["real"][m] = {
            "final": {s: by_round[s][rounds] for s in seeds},
            "gain": {s: 100 * (by_round[s][rounds] - zs[s]) for s in seeds},
            "curve": {r: float(np.mean([by_round[s][r] for s in seeds])) for r in sorted(by_round[seeds[0]])},
            "agents_installed": min(v["agents"] for s in seeds for v in _installed(run, s, m)),
            "bytes": float(np.mean([_bytes_total(run, s, m) for s in seeds])),
        }  # fmt: skip
    for m in IN_PROCESS:
        curves = {s: room["results"][base][s][m] for s in seeds if m in room["results"][base].get(s, {})}
        if len(curves) != len(seeds):
            continue
        out["in_process"][m] = {
            "final": {s: curves[s][rounds] for s in seeds},
            "gain": {s: 100 * (curves[s][rounds] - curves[s][0]) for s in seeds},
            "curve": {r: float(np.mean([curves[s][r] for s in seeds])) for r in range(rounds + 1)},
        }
    out["full_ft_bytes"] = full_ft_round_bytes * rounds
    return out


def _mean(d: dict[str, float]) -> float:
    return float(np.mean(list(d.values())))


def _gain(r: dict) -> tuple[float, float]:
    """Mean and (population, as the reports beside it) sd over seeds of a row's gain, points."""
    return _mean(r["gain"]), float(np.std(list(r["gain"].values())))


def _best_full_ft(s: dict) -> tuple[str, float]:
    ft = {m: _mean(v["final"]) for m, v in s["in_process"].items() if "full-ft" in m}
    m = max(ft, key=ft.__getitem__)
    return m, ft[m]


def _lines(summary: dict) -> list[str]:
    lines = [
        "# FMNIST-FL: the 20-round global target through the real path (issue 13)",
        "",
        *[f"`{c}`" for c in summary["commands"]],
        "`python benchmarks/fmnist_global_real_report.py BASE=RUN.json ...` (or the committed json alone)",
        "",
        __doc__.split("\n\n", 2)[2].strip().replace("\n", " "),
        "",
        "Global accuracy: the adapter the agents installed after the last round, scored without a label "
        "prior (as the in-process runs score it). FedAvg-LoRA runs the agents' default lr 0.005, 1 local "
        "epoch a round, AdamW reset each round (the coordinator's default); `-bsm`: balanced softmax. "
        "Bytes: what the coordinator counted on the wire over all rounds (tasks down, updates up), "
        "against full FT's weights down and up for every agent every round (float32, `fmnist_fl.json`).",
        "",
    ]
    for base, s in summary["bases"].items():
        zs = s["zero_shot"]
        ft_row, ft = _best_full_ft(s) if s["in_process"] else ("-", float("nan"))
        lines += [
            f"## base pretrained {base} steps (seeds {', '.join(s['seeds'])}; real path)",
            "",
            "| row | global (%) | - zero-shot (points) | per seed (points) | - best full-FT FedAvg "
            "| bytes, all rounds |",
            "|---|---:|---:|---|---:|---:|",
            f"| zero-shot (the base, ONNX Runtime) | {_pct(list(zs.values()))} | +0.0 | - | - | - |",
        ]  # fmt: skip
        for how, rows in (("real path", s["real"]), ("in-process", s["in_process"])):
            for m, r in rows.items():
                per_seed = ", ".join(f"{g:+.1f}" for g in r["gain"].values())
                b = r.get("bytes")
                bytes_cell = f"{b / 1e6:.1f} MB ({s['full_ft_bytes'] / b:.0f}x fewer)" if b else "-"
                if "full-ft" in m:
                    bytes_cell = f"{s['full_ft_bytes'] / 1e9:.1f} GB"
                lines.append(
                    f"| {m} ({how}) | {_pct(list(r['final'].values()))} | {_signed(_gain(r))} | {per_seed} | "
                    f"{100 * (_mean(r['final']) - ft):+.1f} | {bytes_cell} |"
                )
        lines += [
            "",
            f"Best full-FT FedAvg: `{ft_row}` ({100 * ft:.1f}%, in-process, after the last round).",
            "",
        ]
        for m, r in s["real"].items():
            gain, gap = _mean(r["gain"]), 100 * (_mean(r["final"]) - ft)
            ratio = s["full_ft_bytes"] / r["bytes"]
            met = [
                "met" if ok else "**missed**"
                for ok in (gain >= ZS_GAIN, gap >= -FT_GAP, ratio >= BYTES_RATIO)
            ]
            lines.append(
                f"- `{m}`, real path: zero-shot {gain:+.1f} (>= +{ZS_GAIN:.0f}: {met[0]}); "
                f"full-FT FedAvg {gap:+.1f} (within {FT_GAP:.0f}: {met[1]}); "
                f"{ratio:.0f}x fewer bytes ({met[2]}); every seed's global "
                f"installed by at least {r['agents_installed']} of {s['agents']} agents."
            )  # fmt: skip
        lines.append("")
    lines += [f"![global accuracy by round]({NAME}.png)", ""]
    return lines


def plot(summary: dict, path: Path) -> None:
    bases = list(summary["bases"].items())
    fig, axes = plt.subplots(1, len(bases), figsize=(6 * len(bases), 4), squeeze=False)
    for ax, (base, s) in zip(axes[0], bases, strict=True):
        zs = 100 * float(np.mean(list(s["zero_shot"].values())))
        ax.axhline(zs, color="grey", lw=1, ls=":", label="zero-shot")
        ax.axhline(zs + ZS_GAIN, color="grey", lw=1, ls="--", label="zero-shot + 10 (target)")
        for how, rows, style in (("real path", s["real"], "o-"), ("in-process", s["in_process"], "-")):
            for m, r in rows.items():
                rs = sorted(int(k) for k in r["curve"])
                ys = [100 * r["curve"][str(k)] for k in rs]
                ax.plot(rs, ys, style, ms=4, lw=1.2, label=f"{m} ({how})")
        ax.set_title(f"base pretrained {base} steps, mean over seeds {', '.join(s['seeds'])}")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("global accuracy, balanced unshifted set (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="*", help="BASE=fmnist_fl_regimes.py json (a base may come twice: seeds)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.runs:
        room = json.loads(ROOM.read_text())
        full_ft = json.loads(FULL_FT_BYTES.read_text())["results"]["0"]["full-ft-fedavg"]["bytes_per_round"]
        runs: dict[str, dict] = {}
        commands = []
        for b, p in (r.split("=", 1) for r in args.runs):
            doc = json.loads(Path(p).read_text())
            commands.append(doc["command"])
            if b in runs:  # more seeds of the same base and protocol
                runs[b]["results"] |= doc["results"]
            else:
                runs[b] = doc
        summary = {
            "commands": commands,
            "bases": {b: summarize(b, run, room, full_ft) for b, run in runs.items()},
            "runs": runs,
        }
        summary = json.loads(json.dumps(summary))  # round keys as the committed json has them
        (args.out / f"{NAME}.json").write_text(json.dumps(summary, indent=1))
    else:
        summary = json.loads((args.out / f"{NAME}.json").read_text())
    (args.out / f"{NAME}.md").write_text("\n".join(_lines(summary)))
    plot(summary, args.out / f"{NAME}.png")
    print(f"report: {args.out / NAME}.md")


if __name__ == "__main__":
    main()
