"""`fmnist_ceiling.py --report RUN.json ...` -> results/fmnist_ceiling.{md,json,png}.

Numbers are means over agents, then mean ± sd over seeds; differences are paired per seed. The
reading of the numbers is `results/fmnist_ceiling_notes.md`, put after the summary when present.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _measure import write_md_json  # the benchmarks folder: run as fmnist_ceiling.py --report
from _plots import panel_grid

TARGET_OWN = 5.0  # issue 13: own accuracy >= local-only + 5 points
TARGET_ALL = -2.0  # all-class >= the better of zero-shot and FedAvg-LoRA - 2 points


def _seeds(run: dict) -> list[dict]:
    return list(run["results"].values())


def _pts(seed: dict, row: str, scale: str = "0.0", which: int = 0) -> float:
    return 100.0 * seed[row][scale][which]


def _ms(xs) -> str:
    xs = np.asarray(list(xs), dtype=float)
    return f"{xs.mean():.1f} ± {xs.std(ddof=1) if len(xs) > 1 else 0.0:.1f}"


def _groups(seed: dict) -> list[str]:
    return [k for k in seed if k.startswith("group-pooled")]


def summary_rows(run: dict) -> list[str]:
    seeds = _seeds(run)
    local = [_pts(s, "local-only") for s in seeds]
    ceiling = [max(_pts(s, g) for g in _groups(s)) - lo for s, lo in zip(seeds, local, strict=True)]
    same = [_pts(s, "group-pooled, local-only's steps") - lo for s, lo in zip(seeds, local, strict=True)]
    fleet = [_pts(s, "fleet-lora") - lo for s, lo in zip(seeds, local, strict=True)]
    bsm = [_pts(s, "all-pooled-bsm 10 ep", "1.0") - lo for s, lo in zip(seeds, local, strict=True)]
    bar = [max(_pts(s, "zero-shot", which=1), _pts(s, "fedavg", which=1)) for s in seeds]
    all_fleet = [_pts(s, "fleet-lora", which=1) - b for s, b in zip(seeds, bar, strict=True)]
    # fleet-lora-bsm's own and all-class at the same prior weight: x1 (the product's default) and x0
    # (no prior at inference). Session 7's table paired own at x1 with all-class at x0 (fixed in 12).
    own_bsm = {w: [_pts(s, "fleet-lora-bsm", w) - lo for s, lo in zip(seeds, local, strict=True)]
               for w in ("1.0", "0.0")}  # fmt: skip
    all_bsm = {w: [_pts(s, "fleet-lora-bsm", w, which=1) - b for s, b in zip(seeds, bar, strict=True)]
               for w in ("1.0", "0.0")}  # fmt: skip
    return [
        _ms(local), _ms(same), _ms(ceiling), _ms(bsm), _ms(fleet), _ms(all_fleet),
        *(f"{_ms(own_bsm[w])} / {_ms(all_bsm[w])}" for w in ("1.0", "0.0")),
        "yes" if np.mean(ceiling) >= TARGET_OWN else "**no**",
    ]  # fmt: skip


def detail(name: str, run: dict) -> list[str]:
    seeds = _seeds(run)
    rows = [k for k in seeds[0] if not k.endswith(" global")]
    out = [f"### {name}", "", f"`{run['command']}` ({run['seconds'] / 60:.1f} min)", "",
           "| row | prior x | own (%) | all-class (%) | global, balanced unshifted (%) |",
           "|---|---:|---:|---:|---:|"]  # fmt: skip
    for row in rows:
        for scale in seeds[0][row]:
            glob = seeds[0].get(row + " global")
            g = _ms(100 * s[row + " global"] for s in seeds) if glob is not None and scale == "0.0" else ""
            out.append(f"| {row} | {scale} | {_ms(_pts(s, row, scale) for s in seeds)} | "
                       f"{_ms(_pts(s, row, scale, 1) for s in seeds)} | {g} |")  # fmt: skip
    return [*out, ""]


def plot(runs: dict, path: Path) -> None:
    plt, fig, axes = panel_grid(len(runs), 4, 4.2, 4)
    for ax, (name, run) in zip(axes, runs.items(), strict=True):
        seeds = _seeds(run)
        for i, row in enumerate(k for k in seeds[0] if not k.endswith(" global")):
            scales = list(seeds[0][row])
            own = [np.mean([_pts(s, row, sc) for s in seeds]) for sc in scales]
            alls = [np.mean([_pts(s, row, sc, 1) for s in seeds]) for sc in scales]
            marker = "s" if "pooled" in row else "o"  # squares: centralized oracles
            style = marker + ("-" if len(scales) > 1 else "")
            ax.plot(alls, own, style, label=row, ms=5, color=plt.get_cmap("tab20")(i))
        ax.set_title(name)
        ax.set_xlabel("all-class accuracy (%)")
        ax.set_ylabel("own accuracy (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, loc="lower left")
    fig.suptitle(
        "own vs all-class, means over seeds (squares: pooled oracles; lines: prior x 0, 0.5, 1 at inference)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(paths: list[Path], out: Path, doc: str) -> None:
    """`doc`: fmnist_ceiling's docstring (its commands and protocol open the report)."""
    runs = {p.stem: json.loads(p.read_text()) for p in paths}
    (out / "fmnist_ceiling.json").write_text(json.dumps(runs, indent=1))
    lines = [
        "# FMNIST-FL: what pooling can buy (the ceiling of issue 13's own-accuracy target), and "
        "balanced-softmax training",
        "",
        doc.split("\n\n", 1)[1].strip("\n"),
        "",
        "## Summary (points; mean ± sd over seeds of per-seed differences)",
        "",
        "| run | local-only own (%) | group-pooled at local-only's steps - local-only "
        "| ceiling: best group-pooled own - local-only | all-pooled-bsm (prior x1) own - local-only "
        "| fleet-lora own - local-only | fleet-lora all-class - bar "
        "| fleet-lora-bsm, prior x1: own - local-only / all-class - bar "
        "| fleet-lora-bsm, prior x0: own - local-only / all-class - bar | +5 reachable by pooling? |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {name} | " + " | ".join(summary_rows(run)) + " |" for name, run in runs.items()]
    lines += ["", "bar: the better of zero-shot and FedAvg-LoRA on all-class (the target is bar - 2).", ""]
    notes = out / "fmnist_ceiling_notes.md"
    if notes.is_file():
        lines += [notes.read_text().rstrip(), ""]
    lines += ["![own vs all-class](fmnist_ceiling.png)", "", "## Every row", ""]
    for name, run in runs.items():
        lines += detail(name, run)
    (out / "fmnist_ceiling.md").write_text("\n".join(lines).rstrip() + "\n")
    plot(runs, out / "fmnist_ceiling.png")
    print(f"report: {out / 'fmnist_ceiling.md'}")


def write_runs_report(paths: list[Path], out: Path, name: str, title: str, doc: str, preface, section,
                      plot_fn) -> None:  # fmt: skip
    """`out/<name>.md, .json, .png` from run JSONs (`fmnist_ensemble`, `fmnist_capacity`): `title`,
    the script's docstring `doc` past its first paragraph (its commands and protocol), the
    `preface(runs)` lines, the plot, `section(run name, run)` for every run, then
    `<name>_notes.md`; `plot_fn(runs, path)` draws the PNG."""
    runs = {p.stem: json.loads(p.read_text()) for p in paths}
    # strip("\n") keeps the commands' indent: markdown shows them as code
    lines = [f"# {title}", "", doc.split("\n\n", 1)[1].strip("\n"), "", *preface(runs)]
    lines += [f"![{title}]({name}.png)", "", "## Every run", ""]
    for run_name, run in runs.items():
        lines += section(run_name, run)
    plot_fn(runs, out / f"{name}.png")
    write_md_json(out, name, lines, runs)
    print(f"report: {out / (name + '.md')}")
