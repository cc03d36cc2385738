"""Issue 13: the device's inference on the real path's adapters (the open-set gate, the prior weight).

    python benchmarks/fmnist_open_set_real.py WORK/scarce-6x32-beta0.1-seed-0 ... --out RUN.json
    python benchmarks/fmnist_open_set_real.py --report RUN.json ...   # -> results/fmnist_open_set_real.*
    python benchmarks/fmnist_open_set_real.py --report results/fmnist_open_set_real.json  # again

Each WORK folder is one seed of `fmnist_fl_regimes.py` (`--work`), run with at least `zero-shot
local-lora` and the `--methods` scored (`fedavg-lora-both-bsm` too for the bar; without it the bar
is zero-shot): the fleet written as image folders and every
agent's final adapter from the real coordinator, agent processes and broker. Each adapter is
scored here by the product's `Classifier` (what a device's application serves with): on the
agent's own split (`test/`) and on its all-class set (`all/`), with the label prior its metadata
carries (`prior`: weight 1, the default; `prior x<w>`: `--prior-weights`), and for fleet-lora with
`open_set=OpenSet(<agent>/train, q)` (`gate <q>`, `device_agent.open_set`: the images that do not
look like the agent's own go to the bundle's own model, without the prior; `gate <q> fleet`: to the
fleet's global adapter after the last round instead, `fallback=`, read from the run's coordinator
registry). The bar is the better of zero-shot and FedAvg-LoRA (balanced softmax) on all-class, as in
`fmnist_base_room_rest.md`. Put the WORK folders before the options (`--prior-weights` takes a list).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _measure import write_md_json  # noqa: E402
from _plots import panel_grid  # noqa: E402
from fmnist_fl_regimes import final_adapters  # noqa: E402
from fmnist_open_set import _ms  # noqa: E402

from fedclip.coordinator.registry import Registry, global_version  # noqa: E402
from fedclip.coordinator.store import DB_NAME, Store  # noqa: E402
from fedclip.device_agent.classifier import Classifier  # noqa: E402
from fedclip.device_agent.loops import classifier_hits  # noqa: E402
from fedclip.device_agent.open_set import OpenSet  # noqa: E402
from fedclip.sdk.adapters import save_adapter  # noqa: E402
from fedclip.sdk.all_class import ALL_SPLIT  # noqa: E402
from fedclip.sdk.data import Dataset  # noqa: E402
from fedclip.sdk.manifest import Manifest  # noqa: E402

QUANTILES = (0.02, 0.05, 0.1)
FLEET, BAR, ALONE = "fleet-lora-bsm", "fedavg-lora-both-bsm", "local-lora"
CORE = "fleet-core-r"  # fleet-core-r<rank>[-bsm]: its own bundle (`fmnist_fl_regimes.core_setup`)


def accuracy(clf: Classifier, folder: Path) -> float:
    hits, n = classifier_hits(clf, Dataset.open(folder, labels=clf.manifest.task.labels))
    return hits / n


def fleet_global(run: Path, bundle: Path, rounds: int, out: Path) -> Path:
    """The global adapter of round `rounds` (`g-r<rounds>`) in `run`'s coordinator registry, written
    to `out`. The registry is read from a copy of its database beside `out` (opening a WAL database
    writes to its files): the work folder stays untouched."""
    coord, copy = run / "coordinator", out.parent / "coordinator"
    copy.mkdir()
    for f in coord.glob(f"{DB_NAME}*"):
        shutil.copy2(f, copy / f.name)
    (copy / "blobs").symlink_to((coord / "blobs").resolve())
    manifest = Manifest.load(bundle)
    with Store(copy, readonly=True) as store:
        tensors, meta = Registry(store, manifest.bundle_id).load(global_version(rounds))
    if set(tensors) != {t.name for t in manifest.trainable}:  # the Predictor would fill in the bundle's
        raise SystemExit(f"{run}: {meta.version} does not hold every trainable tensor of {bundle}")
    return save_adapter(out, tensors, meta)


def score_seed(work: Path, rounds: int, methods: list[str], weights: list[float]) -> dict:
    """Rows `<method> prior` (weight 1), `<method> prior x<w>`, `<method> gate <q>` and
    `fleet-lora-bsm gate <q> fleet`; the baselines' rows (zero-shot, local-only, FedAvg-LoRA for the
    bar) at weight 1 only."""
    with tempfile.TemporaryDirectory(prefix="open-set-real-") as tmp:
        return _score_seed(work, rounds, methods, weights, Path(tmp))


def _score_seed(work: Path, rounds: int, methods: list[str], weights: list[float], tmp: Path) -> dict:
    part = json.loads((work / "data" / "partition.json").read_text())
    agents = part["agents"]
    out: dict = {}
    for method in ("zero-shot", ALONE, BAR, *methods):
        if not (work / method).is_dir():
            print(f"  {work.name} {method}: not run there, left out", flush=True)
            continue
        bundle = work / (
            f"bundle-{method.removesuffix('-bsm')}" if method.startswith(CORE) else "bundle-lora"
        )
        adapters = final_adapters(method, work / method, agents, rounds)
        fleet = None  # fleet-lora's gate rows: also with the fleet's global adapter as the fallback
        if method == FLEET and method in methods:
            fleet = fleet_global(work / method, bundle, rounds, tmp / "global.safetensors")
        for a in agents:
            d = work / "data" / a
            settings: list[tuple[str, float, OpenSet | None, Path | None]] = [("prior", 1.0, None, None)]
            if method in methods:
                settings += [(f"prior x{w:g}", w, None, None) for w in weights if w != 1.0]
                if method == FLEET:
                    for fallback, suffix in ((None, ""), (fleet, " fleet")):
                        settings += [
                            (f"gate {q}{suffix}", 1.0, OpenSet(d / "train", q), fallback) for q in QUANTILES
                        ]
            for name, w, gate, fallback in settings:
                with Classifier.from_bundle(
                    bundle, adapters[a], open_set=gate, prior_weight=w, fallback=fallback
                ) as clf:
                    row = out.setdefault(f"{method} {name}", {"own": {}, "all": {}, "sent_away": {}})
                    row["own"][a] = accuracy(clf, d / "test")
                    row["all"][a] = accuracy(clf, d / ALL_SPLIT)
                    row["sent_away"][a] = clf.swap_stats().open_set_sent_away
        print(f"  {work.name} {method}: done", flush=True)
    return out


def points(run: dict) -> dict[str, tuple[list[float], list[float]]]:
    """{row: (own - local-only per seed, all-class - bar per seed)}, points, means over agents; the
    bar is the better of zero-shot and FedAvg-LoRA where the run has it, else zero-shot."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    baselines = ("zero-shot", ALONE, BAR)
    for seed in run["results"].values():
        alone = 100 * np.mean(list(seed[f"{ALONE} prior"]["own"].values()))
        bars = [f"{m} prior" for m in ("zero-shot", BAR) if f"{m} prior" in seed]
        bar = 100 * max(np.mean(list(seed[k]["all"].values())) for k in bars)
        for k, v in seed.items():
            if not k.startswith(baselines):
                own, alls = out.setdefault(k, ([], []))
                own.append(100 * np.mean(list(v["own"].values())) - alone)
                alls.append(100 * np.mean(list(v["all"].values())) - bar)
    return out


def plot(runs: list[dict], path: Path) -> None:
    """One panel per fleet: own - local-only against all-class - bar, the target corner at top right;
    a method's prior weights joined by a line (0.5, 0.75, 1), the gate's quantiles by another (one
    per fallback: the bundle's own model, the fleet's global adapter)."""
    plt, fig, axes = panel_grid(len(runs), 4, 4.2, 3.9)
    for run, ax in zip(runs, axes, strict=True):
        pts = {k: (float(np.mean(a)), float(np.mean(o))) for k, (o, a) in points(run).items()}
        methods = dict.fromkeys(k.split(" ", 1)[0] for k in pts)
        for method, mk in zip(methods, "os^D", strict=False):
            weights = sorted(
                (float(k.rsplit("x", 1)[1]) if " x" in k else 1.0, xy)
                for k, xy in pts.items()
                if k.startswith(f"{method} prior")
            )
            label = f"{method}, prior x" + "/".join(f"{w:g}" for w, _ in weights)
            color = "C0" if method == FLEET else "C2"  # one colour a line kind, in every panel
            ax.plot(*zip(*(xy for _, xy in weights), strict=True), mk + "-", label=label, color=color)
            for suffix, style, color in (("", "x--", "C1"), (" fleet", "+:", "C4")):
                gate = [pts[k] for q in QUANTILES if (k := f"{method} gate {q}{suffix}") in pts]
                if gate:
                    ax.plot(
                        *zip(*gate, strict=True),
                        style,
                        color=color,
                        label=f"{method}, gate q " + "/".join(map(str, QUANTILES)) + suffix,
                    )
        ax.axvline(-2, color="g", lw=0.8, ls="--")
        ax.axhline(5, color="g", lw=0.8, ls="--")
        ax.set_title(f"{run['fleet']} ({len(run['results'])} seeds)", fontsize=9)
        ax.set(xlabel="all-class - bar (points)", ylabel="own - local-only (points)")
        ax.legend(fontsize=6)
    fig.suptitle(
        "Real path, scored by the Classifier: the targets are the top-right corner (dashed)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(paths: list[Path], out: Path) -> None:
    docs = [json.loads(Path(p).read_text()) for p in paths]
    runs = [r for d in docs for r in d.get("runs", [d])]  # run files, or a report's own .json
    lines = ["# FMNIST-FL: the device's inference on the real path's adapters: the open-set gate and the "
             "prior weight (issue 13)", "",
             (__doc__ or "").split("\n\n", 1)[1].strip("\n"), "", "Runs:", ""]  # fmt: skip
    lines += [f"    {r['command']}" for r in runs]
    for run in runs:
        pts = points(run)
        lines += ["", f"## {run['fleet']} ({len(run['results'])} seeds)", "",
                  "| method, inference | own - local-only | all-class - bar | both targets |",
                  "|---|---:|---:|---|"]  # fmt: skip
        for k, (own, alls) in pts.items():
            met = "**yes**" if np.mean(own) >= 5 and np.mean(alls) >= -2 else "no"
            lines.append(f"| {k} | {_ms(own)} | {_ms(alls)} | {met} |")
        lines += ["", "Per seed, own - local-only / all-class - bar:", ""]
        for k, (own, alls) in pts.items():
            lines.append(
                f"- {k}: " + ", ".join(f"{o:+.1f} / {a:+.1f}" for o, a in zip(own, alls, strict=True))
            )
    plot(runs, out / "fmnist_open_set_real.png")
    lines += ["", "![own vs all-class per fleet](fmnist_open_set_real.png)"]
    write_md_json(out, "fmnist_open_set_real", lines, {"runs": runs})


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("work", type=Path, nargs="*", help="fmnist_fl_regimes.py seed folders")
    ap.add_argument("--rounds", type=int, default=5, help="the runs' rounds (their final adapters)")
    ap.add_argument("--methods", nargs="+", default=[FLEET], help="federated methods to score")
    ap.add_argument("--prior-weights", type=float, nargs="+", default=[1.0], help="beside the gate")
    ap.add_argument("--fleet", default="scarce 6 x 32, 40-step base", help="the fleet, for the report")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, nargs="*")
    args = ap.parse_args()
    if args.report:
        write_report(args.report, HERE / "results")
        return
    if args.out is None or not args.work:
        ap.error("WORK folders and --out are required (or --report)")
    command = "python benchmarks/fmnist_open_set_real.py " + " ".join(sys.argv[1:])
    t0, doc = time.monotonic(), {"command": command, "fleet": args.fleet, "results": {}}
    for work in args.work:
        doc["results"][work.name] = score_seed(work, args.rounds, args.methods, args.prior_weights)
        doc["seconds"] = time.monotonic() - t0
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
