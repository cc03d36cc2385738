"""Issue 13: what the open-set gate costs the device's inference (`Classifier(open_set=...)`).

The same adapter (random, with a two-label prior in its metadata, as a scarce device's), the same
decoded test images (Fashion-MNIST test PNGs when /usr/share/datasets/fashion-mnist is there, else
random RGB; half of them of the device's two labels), each variant in a fresh process (peak RSS its
own):
  prior   `Classifier.from_bundle(bundle, adapter=A)`: the label prior on every image
  gated   the same with `open_set=OpenSet(own, 0.05)`: `own` holds 32 images of each of the two
          labels; the gate is fitted when the classifier is built (and on every adapter swap)
  fallback  gated, the images it sends away going to a second adapter (the fleet's global one a
          `rollout start --fallback` delivers: `fallback=G`) instead of the bundle's own model
at batch 1 and 32: images/s, p50/p99 latency, CPU ms per image; the build time (sessions, and for
`gated` the gate's pass over its images and the bundle's own model); the share of images the gate
sent to the bundle's own model.

    python benchmarks/bench_open_set.py                        # fedclip-tiny, 1 thread
    python benchmarks/bench_open_set.py --model ViT-B-32 --calls 8 --images 64 --out-name open_set-vit-b-32

Writes benchmarks/results/open_set.json and open_set.md (or --out-name NAME.*); `--report` rewrites
the .md from the .json (with `results/NAME_notes.md`, the reading).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _measure as M  # noqa: E402
from bench_inference import BATCHES, _load_images, _timed, work_export  # noqa: E402

OWN = (0, 1)  # the device's two labels
PER_LABEL = 32  # its training images per label


def work_prepare(spec: dict) -> dict:
    """`own/<label>/` (the device's images), `images/` (test images, half of the two labels) and
    an adapter carrying the device's label prior."""
    import gzip

    import numpy as np
    from PIL import Image

    from fedclip.sdk.adapters import AdapterMeta, save_adapter
    from fedclip.sdk.data import label_folder_name
    from fedclip.sdk.manifest import Manifest
    from fedclip.sdk.partition import FASHION_MNIST_DIR as FMNIST

    out, n = Path(spec["work"]), spec["images"]
    m = Manifest.load(spec["bundle"])
    rng = np.random.default_rng(0)
    if FMNIST.is_dir():
        raw = gzip.decompress((FMNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
        imgs = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)
        lab = np.frombuffer(
            gzip.decompress((FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8
        )
        source = "Fashion-MNIST test images (28x28 grey PNG)"
    else:
        imgs = rng.integers(0, 256, (2000, 64, 64, 3), dtype=np.uint8)
        lab = rng.integers(0, 10, 2000).astype(np.uint8)
        source = "random 64x64 RGB PNG"
    own_idx = [np.flatnonzero(lab == k) for k in OWN]
    for k, idx in zip(OWN, own_idx, strict=True):
        folder = out / "own" / label_folder_name(m.task.labels[k])
        folder.mkdir(parents=True, exist_ok=True)
        for i in idx[:PER_LABEL]:
            Image.fromarray(imgs[i]).save(folder / f"{i}.png")
    seen = np.concatenate([idx[PER_LABEL:] for idx in own_idx])[: n // 2]
    unseen = np.flatnonzero(~np.isin(lab, OWN))[: n - len(seen)]
    (out / "images").mkdir(parents=True, exist_ok=True)
    for j, i in enumerate(rng.permutation(np.concatenate([seen, unseen]))):
        Image.fromarray(imgs[i]).save(out / "images" / f"{j:04d}.png")
    counts = tuple(float(PER_LABEL) if k in OWN else 0.0 for k in range(len(m.task.labels)))
    tensors = {t.name: rng.normal(0, 0.05, t.shape).astype(np.float32) for t in m.trainable}
    save_adapter(out / "a.safetensors", tensors, AdapterMeta(m.bundle_id, "bench-a", label_prior=counts))
    fleet = {t.name: rng.normal(0, 0.05, t.shape).astype(np.float32) for t in m.trainable}
    save_adapter(out / "g.safetensors", fleet, AdapterMeta(m.bundle_id, "bench-g"))  # no prior
    return {"source": source, "own_images": PER_LABEL * len(OWN)}


def work_classify(spec: dict) -> dict:
    from fedclip.device_agent.classifier import Classifier
    from fedclip.device_agent.open_set import OpenSet

    work = Path(spec["work"])
    images = _load_images(work)
    rss0 = M.rss_mb()
    gate = OpenSet(work / "own", spec["quantile"]) if spec["gated"] else None
    t0 = time.perf_counter()
    fallback = work / "g.safetensors" if spec.get("fallback") else None
    clf = Classifier.from_bundle(
        spec["bundle"], work / "a.safetensors", threads=spec["threads"], open_set=gate, fallback=fallback
    )
    build_s = time.perf_counter() - t0
    rss_built = M.rss_mb()
    runs = [_timed(clf.predict, images, b, spec["calls"]) for b in BATCHES]
    served = sum(r["batch"] * (r["calls"] + 2) for r in runs)  # _timed's 2 warm-up calls included
    return {"runs": runs, "build_s": build_s, "rss_imports_mb": rss0, "rss_built_mb": rss_built,
            "sent_away_share": clf.swap_stats().open_set_sent_away / served}  # fmt: skip


WORKERS = {"export": work_export, "prepare": work_prepare, "classify": work_classify}


def report(doc: dict) -> str:
    p, g = doc["results"]["prior"], doc["results"]["gated"]
    f = doc["results"].get("fallback")  # runs before session 20 have no fallback column

    def row(name: str, key: str, digits: int = 2, i: int | None = None) -> list[str]:
        a, b = (r[key] if i is None else r["runs"][i][key] for r in (p, g))
        cells = [name, f"{a:.{digits}f}", f"{b:.{digits}f}", f"{M.ratio(b, a):.2f}x"]
        if f is not None:
            c = f[key] if i is None else f["runs"][i][key]
            cells += [f"{c:.{digits}f}", f"{M.ratio(c, b):.2f}x"]
        return cells

    rows = [row("build (s)", "build_s"), row("peak RSS (MiB)", "peak_rss_mb", 0)]
    for i, pr in enumerate(p["runs"]):
        for key, name in (("images_per_s", "images/s"), ("p50_ms", "p50 ms"), ("p99_ms", "p99 ms"),
                          ("cpu_ms_per_image", "CPU ms / image")):  # fmt: skip
            rows.append(row(f"batch {pr['batch']}: {name}", key, i=i))
    header = ["", "prior only", "gated", "gated / prior"]
    if f is not None:
        header += ["gated, fleet fallback", "fallback / gated"]
    lines = [
        f"# The open-set gate's cost at inference ({doc['model']}, {doc['threads']} thread)",
        "",
        f"{doc['started']} - {doc['finished']}; load average {doc['loadavg_start']} -> {doc['loadavg_end']};"
        f" {doc['machine']['cpu_model']}, {doc['machine']['nproc']} CPUs."
        f" Images: {doc['images']} ({doc['image_source']}), half of"
        f" the device's two labels; the gate fitted on {doc['own_images']} own images at q"
        f" {doc['quantile']:g}; {doc['calls']} timed calls per batch size. Command: `{doc['command']}`.",
        "",
        M.md_table(header, rows),
        "",
        f"The gate sent {100 * g['sent_away_share']:.0f}% of the images to the bundle's own model"
        + (f" ({100 * f['sent_away_share']:.0f}% to the fleet's adapter with the fallback)." if f else "."),
    ]
    notes = M.RESULTS / f"{doc['out_name']}_notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--spec")
    ap.add_argument("--model", default="fedclip-tiny")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--calls", type=int, default=40, help="Timed calls per batch size.")
    ap.add_argument("--quantile", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-name", default="open_set")
    ap.add_argument("--report", action="store_true", help="only rewrite NAME.md from NAME.json (--out-name)")
    args = ap.parse_args()
    if args.worker:
        M.emit(WORKERS[args.worker](json.loads(args.spec)))
        return
    if args.report:
        doc = json.loads((M.RESULTS / f"{args.out_name}.json").read_text())
        (M.RESULTS / f"{args.out_name}.md").write_text(report(doc))
        return
    started, load0 = M.utc_now(), M.loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-open-set-"))
    try:
        bundle = tmp / "bundle"
        print(f"exporting {args.model} ...", file=sys.stderr)
        M.run_worker(
            __file__,
            "export",
            {"model": args.model, "out": str(bundle), "format": "ort-training"},
            args.threads,
        )
        spec = {"bundle": str(bundle), "work": str(tmp / "work"), "images": args.images, "calls": args.calls,
                "threads": args.threads, "quantile": args.quantile}  # fmt: skip
        prep = M.run_worker(__file__, "prepare", spec, args.threads).result
        results = {}
        for name, gated, fallback in (
            ("prior", False, False),
            ("gated", True, False),
            ("fallback", True, True),
        ):
            print(f"running {name} ...", file=sys.stderr)
            run = M.run_worker(__file__, "classify", dict(spec, gated=gated, fallback=fallback), args.threads)
            results[name] = dict(run.result, peak_rss_mb=run.peak_rss_mb, wall_s=run.wall_s)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"started": started, "finished": M.utc_now(), "loadavg_start": load0, "loadavg_end": M.loadavg(),
           "machine": M.machine(), "model": args.model, "threads": args.threads, "images": args.images,
           "image_source": prep["source"], "own_images": prep["own_images"], "quantile": args.quantile,
           "calls": args.calls, "out_name": args.out_name, "results": results,
           "command": "python benchmarks/bench_open_set.py " + " ".join(sys.argv[1:])}  # fmt: skip
    M.write_json(M.RESULTS / f"{args.out_name}.json", doc)
    (M.RESULTS / f"{args.out_name}.md").write_text(report(doc))
    print(report(doc))


if __name__ == "__main__":
    main()
