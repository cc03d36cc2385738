"""Issue 15: on-device inference, `Classifier` (Python API) and `serve-inference` (HTTP) vs open_clip.

On the same decoded images (Fashion-MNIST test PNGs when /usr/share/datasets/fashion-mnist is there,
else random RGB), with the same adapter, each run a fresh process (peak RSS its own):
  api     `Classifier.from_bundle(bundle, adapter=A).predict(pil_images)` (preprocessing included)
  http    a `fedclip-agent serve-inference` process; the client POSTs base64 PNGs to /predict over a
          keep-alive connection (decode + preprocessing + JSON included); the server's peak RSS
  torch   open_clip in PyTorch: the merged checkpoint of the same adapter (`adapters export
          --format open_clip`), open_clip's own eval transform, logits against cached label embeddings
at batch 1 and 32: images/s and per-call latency p50/p99. Then the adapter swap: a Classifier
following a real agent state dir (`AgentState.install_adapter`/`set_current_adapter`, as the agent
writes it) while a thread predicts without pause: time to build the new adapter's sessions, time
from the state write to the first request served by it, and failed or mixed requests (must be 0).

    python benchmarks/bench_inference.py                       # fedclip-tiny, 1 thread
    python benchmarks/bench_inference.py --model ViT-B-32 --calls 16 --images 64 --swaps 6 \
        --out-name inference-vit-b-32
    python benchmarks/bench_inference.py --bundle DIR          # reuse an exported bundle

Every training format carries the same inference and text encoder graphs, so the export defaults to
`--format ort-training`, the quickest to build (ViT-B-32: 26 s against 404 s for a step export that
misses the export cache, benchmarks/results/export_profile_vit_b_32.md).

Writes benchmarks/results/inference.json and inference.md (or --out-name NAME.*).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _measure as M  # noqa: E402

BATCHES = (1, 32)


# ---- workers (each in its own process) ----------------------------------------------------------
def work_export(spec: dict) -> dict:
    from fedclip.exporters.bundle import export_bundle
    from fedclip.exporters.config import ExportConfig
    from fedclip.sdk.partition import FASHION_MNIST_CLASSES as LABELS

    t0 = time.perf_counter()
    export_bundle(
        ExportConfig(
            model=spec["model"], out=spec["out"], task="classify", labels=LABELS, format=spec["format"]
        ),
        show_progress=False,
    )
    return {"export_s": time.perf_counter() - t0}


def work_prepare(spec: dict) -> dict:
    """PNG files of the images, two random adapters, and the merged open_clip checkpoint of A."""
    import gzip
    import io

    import numpy as np
    from PIL import Image

    from fedclip.exporters.adapter_export import write_open_clip
    from fedclip.sdk.adapters import AdapterMeta, save_adapter
    from fedclip.sdk.manifest import Manifest
    from fedclip.sdk.partition import FASHION_MNIST_DIR as FMNIST

    out = Path(spec["work"])
    (out / "images").mkdir(parents=True, exist_ok=True)
    n = spec["images"]
    if FMNIST.is_dir():
        raw = gzip.decompress((FMNIST / "t10k-images-idx3-ubyte.gz").read_bytes())
        imgs = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:n]
        source = "Fashion-MNIST test images (28x28 grey PNG)"
    else:
        imgs = np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
        source = "random 64x64 RGB PNG"
    for i, a in enumerate(imgs):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        (out / "images" / f"{i:04d}.png").write_bytes(buf.getvalue())
    m = Manifest.load(spec["bundle"])
    rng = np.random.default_rng(1)
    tensors = {}
    for v in ("bench-a", "bench-b"):
        tensors[v] = {t.name: rng.normal(0, 0.05, t.shape).astype(np.float32) for t in m.trainable}
        save_adapter(out / f"{v}.safetensors", tensors[v], AdapterMeta(bundle_id=m.bundle_id, version=v))
    exchanged = {t.name for t in m.exchanged}
    ckpt = write_open_clip(
        m, {k: v for k, v in tensors["bench-a"].items() if k in exchanged}, out / "merged.pt"
    )
    return {"source": source, "checkpoint": [str(p) for p in ckpt], "formats": list(m.formats)}


def _load_images(work: Path):
    from PIL import Image

    out = []
    for p in sorted((work / "images").glob("*.png")):
        with Image.open(p) as img:
            img.load()
            out.append(img.copy())
    return out


def _timed(fn, images: list, batch: int, calls: int, warmup: int = 2, cpu=time.process_time) -> dict:
    """Wall-clock latency per call, and the CPU seconds the serving process spent (`cpu()`: this
    process's, or the server's for HTTP). On a shared machine the wall clock follows the load; CPU
    time per image hardly does, so its ratios are the comparison that holds."""
    import statistics

    chunks = [images[(i * batch) % len(images) :][:batch] for i in range(calls + warmup)]
    chunks = [c if len(c) == batch else (c + images)[:batch] for c in chunks]
    for c in chunks[:warmup]:
        fn(c)
    lat = []
    cpu0 = cpu()
    for c in chunks[warmup:]:
        t0 = time.perf_counter()
        fn(c)
        lat.append(time.perf_counter() - t0)
    cpu_s = cpu() - cpu0
    lat.sort()
    return {
        "batch": batch,
        "calls": calls,
        "images_per_s": batch * len(lat) / sum(lat),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))],
        "cpu_s": cpu_s,
        "cpu_ms_per_image": 1000 * cpu_s / (batch * len(lat)),
    }


def _proc_cpu(pid: int):
    """CPU seconds (user + system) of process `pid` so far, from /proc (10 ms ticks)."""
    import os

    tick = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    return read


def work_api(spec: dict) -> dict:
    from fedclip.device_agent.classifier import Classifier

    work = Path(spec["work"])
    images = _load_images(work)
    rss0 = M.rss_mb()
    clf = Classifier.from_bundle(
        spec["bundle"], adapter=work / "bench-a.safetensors", threads=spec["threads"]
    )
    runs = [_timed(clf.predict, images, b, spec["calls"]) for b in BATCHES]
    return {"runs": runs, "rss_imports_mb": rss0}


def work_torch(spec: dict) -> dict:
    import open_clip
    import torch

    from fedclip.sdk.manifest import Manifest

    torch.set_num_threads(spec["threads"])
    work = Path(spec["work"])
    m = Manifest.load(spec["bundle"])
    images = _load_images(work)
    rss0 = M.rss_mb()
    name = m.base_model.name
    cfg = work / f"{name}.json"
    if cfg.is_file():
        open_clip.add_model_config(cfg)
    model = open_clip.create_model(name, pretrained=str(work / "merged.pt")).eval()
    pp = m.preprocess
    transform = open_clip.image_transform(pp.image_size, is_train=False, mean=pp.mean, std=pp.std)
    with torch.no_grad():
        tokens = open_clip.tokenize(m.task.prompts(), context_length=m.tokenizer.context_length)
        text = model.encode_text(tokens, normalize=True)
        scale = model.logit_scale.exp()

    def predict(batch: list) -> Any:
        with torch.no_grad():
            x = torch.stack([transform(img) for img in batch])
            return (scale * model.encode_image(x, normalize=True) @ text.T).numpy()

    runs = [_timed(predict, images, b, spec["calls"]) for b in BATCHES]
    return {"runs": runs, "rss_imports_mb": rss0}


def work_http(spec: dict) -> dict:
    """Client side; the server is a `fedclip-agent serve-inference` process of its own."""
    import base64
    import http.client
    import os
    import signal
    import subprocess

    work = Path(spec["work"])
    pngs = [base64.b64encode(p.read_bytes()).decode() for p in sorted((work / "images").glob("*.png"))]
    log = work / "serve.log"
    with open(log, "w") as f:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fedclip.device_agent.cli",
                "serve-inference",
                "--bundle",
                spec["bundle"],
                "--adapter",
                str(work / "bench-a.safetensors"),
                "--port",
                "0",
                "--threads",
                str(spec["threads"]),
                "-q",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 300
        while "serving inference on" not in log.read_text():
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.05)
        line = next(ln for ln in log.read_text().splitlines() if "serving inference on" in ln)
        host, port = line.split("http://", 1)[1].split(" ", 1)[0].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=300)

        def predict(batch: list) -> Any:
            conn.request(
                "POST",
                "/predict",
                body=json.dumps({"images": batch, "top_k": 1}),
                headers={"Content-Type": "application/json"},
            )
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise RuntimeError(body[:300])
            return body

        runs = [_timed(predict, pngs, b, spec["calls"], cpu=_proc_cpu(server.pid)) for b in BATCHES]
        status = Path(f"/proc/{server.pid}/status").read_text()
        hwm = next(int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmHWM:")) / 1024
        conn.close()
    finally:
        server.send_signal(signal.SIGTERM)
        rc = server.wait(timeout=60)
    del os
    return {"runs": runs, "server_peak_rss_mb": hwm, "server_exit": rc}


def work_swap(spec: dict) -> dict:
    import threading

    import numpy as np

    from fedclip.device_agent.classifier import Classifier
    from fedclip.device_agent.state import AgentState
    from fedclip.sdk.adapters import load_adapter
    from fedclip.sdk.manifest import Manifest

    work = Path(spec["work"])
    images = _load_images(work)[:1]
    m = Manifest.load(spec["bundle"])
    state_dir = work / "agent-state"
    bundles = state_dir / "bundles"
    bundles.mkdir(parents=True, exist_ok=True)
    st = AgentState(state_dir, agent_id="bench", fleet="bench", bundle_id=m.bundle_id)
    adapters = {v: load_adapter(work / f"{v}.safetensors") for v in ("bench-a", "bench-b")}
    for v, (t, meta) in adapters.items():
        st.install_adapter(v, t, meta, source="rollout")
    st.set_current_adapter("bench-a")
    refs = {
        v: Classifier.from_bundle(spec["bundle"], adapter=work / f"{v}.safetensors", threads=spec["threads"])
        .predict(images)
        .logits
        for v in adapters
    }
    clf = Classifier.from_state(state_dir, bundle=spec["bundle"], poll=0.05, threads=spec["threads"])
    results, errors, stop = [], [], threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                results.append(clf.predict(images))
            except Exception as e:  # counted, never raised: the benchmark reports failures
                errors.append(repr(e))

    worker = threading.Thread(target=hammer, daemon=True)
    worker.start()
    switch_s, build_s = [], []
    for i in range(spec["swaps"]):
        target = "bench-b" if i % 2 == 0 else "bench-a"
        time.sleep(0.2)  # requests on the old adapter in between
        t0 = time.perf_counter()
        st.set_current_adapter(target)  # what a rollout (or its rollback) does to the state dir
        if not clf.wait_for(target, 120):
            raise RuntimeError(f"no switch to {target}")
        switch_s.append(time.perf_counter() - t0)
    stop.set()
    worker.join(timeout=60)
    clf.close()
    for v, (t, _) in adapters.items():  # the build alone: sessions for one adapter, fully loaded
        t0 = time.perf_counter()
        clf._build(v, t)
        build_s.append(time.perf_counter() - t0)
    mixed = sum(not np.allclose(r.logits, refs[r.adapter_version], atol=1e-5) for r in results)
    st.close()
    return {
        "swaps": spec["swaps"],
        "requests": len(results),
        "failed": len(errors),
        "errors": errors[:3],
        "mixed": int(mixed),
        "switch_ms": [round(1000 * s, 1) for s in switch_s],
        "switch_ms_median": 1000 * sorted(switch_s)[len(switch_s) // 2],
        "switch_ms_max": 1000 * max(switch_s),
        "build_ms_median": 1000 * sorted(build_s)[len(build_s) // 2],
        "poll_ms": 50,
    }


WORKERS = {
    "export": work_export,
    "prepare": work_prepare,
    "api": work_api,
    "torch": work_torch,
    "http": work_http,
    "swap": work_swap,
}


# ---- parent ---------------------------------------------------------------------------------------
def _child(name: str, spec: dict, args: argparse.Namespace) -> M.ChildRun:
    return M.run_worker(__file__, name, spec, args.threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--spec")
    ap.add_argument("--model", default="fedclip-tiny")
    ap.add_argument("--bundle", type=Path)
    ap.add_argument(
        "--format",
        default="ort-training",
        choices=("step", "ort-training", "both"),
        help="Training format of the exported bundle (the inference graphs are the same in each).",
    )
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--calls", type=int, default=40, help="Timed calls per batch size.")
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out-name", default="inference")
    args = ap.parse_args()
    if args.worker:
        M.emit(WORKERS[args.worker](json.loads(args.spec)))
        return

    started, load0 = M.utc_now(), M.loadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    try:  # the work dir holds a merged checkpoint (ViT-B-32: ~600 MB), and an exported bundle
        bundle = args.bundle
        export_s = None
        if bundle is None:
            bundle = tmp / "bundle"
            print(f"exporting {args.model} ...", file=sys.stderr)
            export_s = _child(
                "export", {"model": args.model, "out": str(bundle), "format": args.format}, args
            ).result["export_s"]
        spec = {
            "bundle": str(bundle),
            "work": str(tmp / "work"),
            "images": args.images,
            "calls": args.calls,
            "threads": args.threads,
            "swaps": args.swaps,
        }
        prep = _child("prepare", spec, args).result
        results: dict[str, Any] = {}
        for side in ("api", "http", "torch", "swap"):
            print(f"running {side} ...", file=sys.stderr)
            run = _child(side, spec, args)
            results[side] = dict(run.result, peak_rss_mb=run.peak_rss_mb, wall_s=run.wall_s)
        doc = {
            "started": started,
            "finished": M.utc_now(),
            "loadavg_start": load0,
            "loadavg_end": M.loadavg(),
            "machine": M.machine(),
            "model": args.model,
            "threads": args.threads,
            "images": args.images,
            "image_source": prep["source"],
            "bundle_formats": prep["formats"],
            "calls": args.calls,
            "export_s": export_s,
            "results": results,
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    M.write_json(M.RESULTS / f"{args.out_name}.json", doc)
    (M.RESULTS / f"{args.out_name}.md").write_text(report(doc))
    print(report(doc))


def _calls_note(calls: int | None) -> str:
    if calls is None:  # reports written before the count was recorded
        return "."
    return f", {calls} timed calls per batch size after 2 warm-up calls" + (
        " (so p99 is the slowest call)." if calls < 100 else "."
    )


def report(doc: dict) -> str:
    r = doc["results"]
    mach = doc["machine"]
    lines = [
        f"# Inference benchmark: `Classifier` and `serve-inference` vs open_clip ({doc['model']}, CPU)",
        "",
        f"Run {doc['started']} to {doc['finished']} on {mach['nproc']} x {mach['cpu_model']}, "
        f"{mach['mem_total_gb']} GB RAM; load average {doc['loadavg_start']} at start, "
        f"{doc['loadavg_end']} at end (a machine shared with other jobs: absolute times are noisy, "
        "ratios of back-to-back runs are the robust part). Every side under `nice -n 15`, "
        f"{doc['threads']} thread(s) (ONNX Runtime intra-op threads; `torch.set_num_threads`).",
        "",
        f"Versions: {', '.join(f'{k} {v}' for k, v in mach['versions'].items())}.",
        "",
        f"Images: {doc['images']} {doc['image_source']}, decoded once into PIL images (API, PyTorch) "
        "or sent as base64 PNG (HTTP: the server decodes them). Every side preprocesses every call "
        "(resize, crop, normalize) and scores the 10 Fashion-MNIST labels with the same random "
        "adapter (LoRA on q,v of both towers); PyTorch runs the merged checkpoint of that adapter "
        "(`fedclip-coord adapters export --format open_clip`) with label embeddings computed once. "
        "Latency is per call (a call = one batch)" + _calls_note(doc.get("calls")),
        f"Bundle: training format {', '.join(doc.get('bundle_formats', ['step']))} (every format carries "
        "the same inference and text encoder graphs)"
        + (f"; its export took {doc['export_s']:.0f} s." if doc.get("export_s") else "."),
        "",
    ]
    rows = []
    base = {x["batch"]: x for x in r["torch"]["runs"]}
    has_cpu = all("cpu_ms_per_image" in x for side in ("api", "http", "torch") for x in r[side]["runs"])
    for side, label, rss in (
        ("api", "Classifier.predict (Python API)", r["api"]["peak_rss_mb"]),
        ("http", "serve-inference POST /predict", r["http"]["server_peak_rss_mb"]),
        ("torch", "open_clip in PyTorch", r["torch"]["peak_rss_mb"]),
    ):
        for x in r[side]["runs"]:
            speed = M.ratio(x["images_per_s"], base[x["batch"]]["images_per_s"])
            row = [label, x["batch"], x["images_per_s"], x["p50_ms"], x["p99_ms"], f"{speed:.2f}x"]
            if has_cpu:
                cost = M.ratio(base[x["batch"]]["cpu_ms_per_image"], x["cpu_ms_per_image"])
                row += [x["cpu_ms_per_image"], f"{cost:.2f}x"]
            rows.append([*row, f"{rss:,.0f}"])
    header = ["side", "batch", "images/s", "p50 (ms)", "p99 (ms)", "images/s vs PyTorch"]
    if has_cpu:
        header += ["CPU ms per image", "images per CPU-second vs PyTorch"]
    lines += [
        "## Throughput and latency",
        "",
        M.md_table([*header, "peak RSS (MiB)"], rows),
        "",
        "Peak RSS: the API and PyTorch processes' own ru_maxrss; for HTTP the server process's "
        "VmHWM (the client is a separate process).",
    ]
    if has_cpu:
        lines += [
            "CPU ms per image: the CPU time (user + system, all threads) of the process that serves "
            "(the API's and PyTorch's own, the HTTP server's from /proc: decoding, JSON and inference), "
            "over the timed calls. Wall-clock numbers follow the machine's load, which changes between "
            "sides measured minutes apart; CPU time hardly does, so the CPU ratio is the comparison "
            "that holds on a shared machine."
        ]
    lines += [""]
    s = r["swap"]
    lines += [
        "## Adapter swap under load",
        "",
        f"A Classifier following an agent state dir while one thread predicts (batch 1) without pause; "
        f"{s['swaps']} switches alternating two adapters, written the way the agent's rollout "
        f"handling writes them (`AgentState.set_current_adapter`), state file polled every "
        f"{s['poll_ms']} ms.",
        "",
        M.md_table(
            [
                "requests during the run",
                "failed",
                "mixed (logits not those of the version they name)",
                "switch: state write to first request on the new adapter, median / max (ms)",
                "building one adapter's sessions, median (ms)",
            ],
            [
                [
                    s["requests"],
                    s["failed"],
                    s["mixed"],
                    f"{s['switch_ms_median']:.0f} / {s['switch_ms_max']:.0f}",
                    f"{s['build_ms_median']:.0f}",
                ]
            ],
        ),
        "",
        "The switch time is the poll interval plus the build: requests keep being served by the old adapter "
        "while the new one's sessions load, then one reference swap moves them over.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
