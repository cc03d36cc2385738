"""`fedclip-agent train | eval | predict | serve-inference`: offline use of a bundle, no broker needed.

Human output is a short table; `--json` prints one JSON object on stdout (progress bars go to stderr).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import typer

from fedclip.sdk.adapters import AdapterMeta
from fedclip.sdk.cli import setup_logging
from fedclip.sdk.errors import DataError

log = logging.getLogger(__name__)

_BUNDLE = typer.Option(..., "--bundle", help="Bundle folder made by `fedclip-coord export`.")
_DEVICE = typer.Option(
    "auto", "--device", help="auto (CUDA where the onnxruntime build has it, else CPU) | cpu | cuda."
)
_BACKEND = typer.Option(
    "auto",
    "--backend",
    help="auto | step (portable step graph, any onnxruntime) | ort-training (ONNX Runtime training "
    "API); auto picks ort-training when it is installed and the bundle has its artifacts.",
)
_THREADS = typer.Option(None, "--threads", min=1, help="CPU threads for ONNX Runtime (default: all cores).")
_QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars, warnings only.")
_JSON = typer.Option(False, "--json", help="Print the metrics as one JSON object on stdout.")
_ADAPTER = typer.Option(
    None, "--adapter", help="Adapter (.safetensors) to load; default: the bundle's initial one."
)
_PRIOR = typer.Option(
    1.0,
    "--prior-weight",
    min=0.0,
    max=10.0,
    help="A balanced-softmax adapter carries the label prior it was trained without: this much of it "
    "is added to the logits (1: the device's own label mix, 0: every label alike).",
)
_OPEN_SET = typer.Option(
    None,
    "--open-set",
    help="This device's labelled training images: an image unlike them is scored by the bundle's "
    "own model, without the label prior (docs/inference.md, 'Open-set gate').",
)
_OPEN_SET_Q = typer.Option(
    0.05, "--open-set-quantile", help="Share of the device's own images the gate may send away."
)
_CACHE = typer.Option(
    None,
    "--cache-dir",
    help="Image-embedding cache for text-tower bundles (default: ~/.cache/fedclip/embeddings).",
)


def _emit(metrics: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(metrics, sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    for key, value in metrics.items():
        if isinstance(value, float):
            text = str(int(value)) if value.is_integer() else f"{value:.4f}"
        else:
            text = str(value)
        table.add_row(key, text)
    Console().print(table)


def _open_trainer(
    bundle: Path, adapter: Path | None, device: str, threads: int | None, quiet: bool, backend: str = "auto"
):
    """(trainer with the adapter loaded, that adapter's metadata or None, show progress bars)."""
    from fedclip.device_agent.step_backend import make_trainer

    setup_logging(quiet=quiet)
    trainer = make_trainer(bundle, backend=backend, device=device, threads=threads)
    meta = trainer.load_adapter(adapter) if adapter is not None else None
    return trainer, meta, not quiet


def _prior_bias(manifest, counts, weight: float, where: str) -> np.ndarray | None:
    """What the device adds to the logits for an adapter trained without this label histogram."""
    from fedclip.sdk.label_prior import inference_bias

    return inference_bias(counts, len(manifest.task.labels), weight, where)


def _open_data(data: Path, manifest, holdout: float):
    from fedclip.sdk.data import Dataset

    dataset = Dataset.open(data, labels=manifest.task.labels, kind=manifest.task.kind)
    if holdout <= 0:
        return dataset, None
    train_set, held_out = dataset.split(holdout)
    if not len(train_set) or not len(held_out):
        raise DataError(f"{data}: too few images for a held-out split of {holdout:g}")
    return train_set, held_out


def train(
    bundle: Path = _BUNDLE,
    data: Path = typer.Option(..., "--data", help="Image folder (one sub-folder per label), CSV or JSONL."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Passes over the training data."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per step."),
    lr: float = typer.Option(1e-3, "--lr", min=0.0, help="Learning rate (AdamW)."),
    max_steps: int = typer.Option(None, "--max-steps", min=1, help="Stop after this many steps."),
    holdout: float = typer.Option(
        0.0,
        "--holdout",
        min=0.0,
        max=0.99,
        help="Fraction kept out of training and evaluated (by file name hash).",
    ),
    adapter: Path = _ADAPTER,
    out: Path = typer.Option(None, "--out", help="Write the trained adapter here (.safetensors)."),
    seed: int = typer.Option(0, "--seed", help="Shuffle seed."),
    loss: str = typer.Option(
        "ce",
        "--loss",
        help="ce, or balanced-softmax: train without this data's label mix; the adapter keeps the "
        "mix in its metadata and inference adds it back (docs/aggregation.md).",
    ),
    prox_mu: float = typer.Option(
        0.0,
        "--prox-mu",
        min=0.0,
        help="Personal tuning: add (mu / 2) ||w - start||^2 to the loss, start the --adapter (or the "
        "bundle's initial tensors), so the adapter learns this device's images and stays near the "
        "fleet's (docs/aggregation.md, 'Personal tuning'). Needs the step backend (auto picks it).",
    ),
    device: str = _DEVICE,
    backend: str = _BACKEND,
    threads: int = _THREADS,
    cache_dir: Path = _CACHE,
    quiet: bool = _QUIET,
    as_json: bool = _JSON,
) -> None:
    """Train the bundle's adapter on local data; optionally evaluate a held-out part and save the adapter."""
    from fedclip.device_agent.batches import batch_source
    from fedclip.device_agent.loops import evaluate, train_local
    from fedclip.sdk import label_prior
    from fedclip.sdk.wire import tensors_digest

    if loss not in label_prior.LOSSES:
        raise DataError(f"--loss: {loss!r} is not one of {', '.join(label_prior.LOSSES)}")
    if prox_mu and backend == "auto":  # ORT's training artifacts have no proximal term
        backend = "step"
    trainer, start, progress = _open_trainer(bundle, adapter, device, threads, quiet or as_json, backend)
    manifest = trainer.manifest
    start_tensors = trainer.get_tensors("trainable")
    trainer.set_prox(start_tensors, prox_mu)
    why = label_prior.unsupported(loss, manifest, str(bundle))
    if why:
        raise DataError(f"--loss {why}")
    train_set, held_out = _open_data(data, manifest, holdout)
    source = batch_source(trainer, train_set, cache_dir=cache_dir, progress=progress)
    counts: tuple[float, ...] = ()
    if loss == "balanced-softmax":
        counts, source.label_bias = label_prior.training_prior(train_set)
    metrics: dict = {}
    if held_out is not None:
        eval_source = batch_source(trainer, held_out, cache_dir=cache_dir, progress=progress)
        eval_source.label_bias = source.label_bias
        before_bias = _prior_bias(manifest, start.label_prior if start else (), 1.0, str(adapter))
        before = evaluate(trainer, eval_source, batch_size=batch_size, logit_bias=before_bias)
        metrics.update({f"{k}_before": v for k, v in before.items() if k != "num_samples"})
    result = train_local(
        trainer,
        source,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        max_steps=max_steps,
        progress=progress,
        seed=seed,
    )
    metrics.update({f"train_{k}": v for k, v in result.items()})
    metrics["num_train"] = sum(s.key not in train_set.skipped for s in train_set)
    if held_out is not None:
        after_bias = _prior_bias(manifest, counts, 1.0, str(data))
        after = evaluate(trainer, eval_source, batch_size=batch_size, logit_bias=after_bias)
        metrics.update({f"{k}_after": v for k, v in after.items() if k != "num_samples"})
        metrics["num_held_out"] = int(after["num_samples"])
    metrics["skipped_images"] = len(train_set.skipped)
    tensors = trainer.get_tensors("trainable")
    # how far training moved the adapter from where it started (L2 over every trainable tensor)
    metrics["moved"] = float(
        np.sqrt(sum(float(np.sum((tensors[k] - start_tensors[k]) ** 2)) for k in tensors))
    )
    if prox_mu:
        metrics["prox_mu"] = prox_mu
    if out is not None:
        kind = "personal" if prox_mu else "local"
        meta = AdapterMeta(
            bundle_id=trainer.manifest.bundle_id,
            version=f"{kind}-{tensors_digest(tensors)[:12]}",
            parent_version=start.version if start else "",
            strategy=kind,
            kind=trainer.manifest.adapter.kind,
            label_prior=counts,
        )
        trainer.save_adapter(out, meta, which="trainable")
        metrics["adapter"] = str(out)
        metrics["adapter_version"] = meta.version
    _emit(metrics, as_json, "training")


def eval(  # noqa: A001 - the command is called `eval`
    bundle: Path = _BUNDLE,
    data: Path = typer.Option(..., "--data", help="Image folder (one sub-folder per label), CSV or JSONL."),
    adapter: Path = _ADAPTER,
    holdout: float = typer.Option(
        0.0,
        "--holdout",
        min=0.0,
        max=0.99,
        help="Evaluate only the held-out part `train --holdout` kept out.",
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per step."),
    prior_weight: float = _PRIOR,
    open_set: Path = _OPEN_SET,
    open_set_quantile: float = _OPEN_SET_Q,
    device: str = _DEVICE,
    backend: str = _BACKEND,
    threads: int = _THREADS,
    cache_dir: Path = _CACHE,
    quiet: bool = _QUIET,
    as_json: bool = _JSON,
) -> None:
    """Evaluate loss and accuracy of an adapter on local labelled data (accuracy as the device's
    inference scores it: with a balanced-softmax adapter's label prior x --prior-weight; with
    --open-set, accuracy only, as the gated `Classifier` answers)."""
    from fedclip.device_agent.batches import batch_source
    from fedclip.device_agent.loops import evaluate

    if open_set is not None:
        from fedclip.device_agent.open_set import OpenSet

        gate = OpenSet(open_set, open_set_quantile)
        setup_logging(quiet=quiet or as_json)
        metrics = _gated_accuracy(bundle, adapter, data, holdout, gate, prior_weight, device, threads)
        _emit(metrics, as_json, "evaluation")
        return

    trainer, meta, progress = _open_trainer(bundle, adapter, device, threads, quiet or as_json, backend)
    dataset, held_out = _open_data(data, trainer.manifest, holdout)
    dataset = held_out if held_out is not None else dataset
    source = batch_source(trainer, dataset, cache_dir=cache_dir, progress=progress)
    bias = _prior_bias(trainer.manifest, meta.label_prior if meta else (), prior_weight, str(adapter))
    metrics = evaluate(trainer, source, batch_size=batch_size, progress=progress, logit_bias=bias)
    metrics["label_prior"] = bias is not None
    metrics["num_samples"] = int(metrics["num_samples"])
    metrics["skipped_images"] = len(dataset.skipped)
    _emit(metrics, as_json, "evaluation")


def _gated_accuracy(bundle: Path, adapter: Path | None, data: Path, holdout: float, gate, prior_weight: float,
                    device: str, threads: int | None) -> dict:  # fmt: skip
    """`eval --open-set`: the accuracy of the `Classifier` with the open-set gate on `data`."""
    from fedclip.device_agent.classifier import Classifier
    from fedclip.device_agent.loops import classifier_hits
    from fedclip.sdk.manifest import Manifest

    dataset, held_out = _open_data(data, Manifest.load(bundle), holdout)
    dataset = held_out if held_out is not None else dataset
    kw = dict(open_set=gate, prior_weight=prior_weight, device=device, threads=threads)
    with Classifier.from_bundle(bundle, adapter, **kw) as clf:
        hits, n = classifier_hits(clf, dataset)
        sent = clf.swap_stats().open_set_sent_away
        on, prior = clf.open_set_gate is not None, clf.label_prior
    if not n:
        raise DataError(f"{data}: no readable images to evaluate")
    return {"accuracy": hits / n, "num_samples": n, "label_prior": prior, "open_set": on,
            "open_set_sent_away": sent, "skipped_images": len(dataset.skipped)}  # fmt: skip


def predict(
    images: list[Path] = typer.Argument(..., help="Image files to classify."),
    bundle: Path = _BUNDLE,
    adapter: Path = _ADAPTER,
    top_k: int = typer.Option(3, "--top-k", min=1, help="Labels to show per image."),
    prior_weight: float = _PRIOR,
    device: str = _DEVICE,
    threads: int = _THREADS,
    quiet: bool = _QUIET,
    as_json: bool = _JSON,
) -> None:
    """Classify images with the bundle (and an adapter): top-k labels with softmax scores."""
    from fedclip.device_agent.predictor import Predictor
    from fedclip.sdk.adapters import load_adapter
    from fedclip.sdk.manifest import Manifest
    from fedclip.sdk.preprocess import load_image

    setup_logging(quiet=quiet or as_json)
    manifest = Manifest.load(bundle)
    if manifest.task.kind != "classify":
        raise DataError(f"{bundle}: predict needs a classify bundle (this one is {manifest.task.kind})")
    tensors, bias = None, None
    if adapter is not None:
        tensors, meta = load_adapter(adapter)
        if meta.bundle_id != manifest.bundle_id:
            raise DataError(f"{adapter}: adapter was made for bundle {meta.bundle_id[:12]}, not this one")
        bias = _prior_bias(manifest, meta.label_prior, prior_weight, str(adapter))
    predictor = Predictor(bundle, adapter=tensors, device=device, threads=threads, manifest=manifest)
    labels = manifest.task.labels
    k = min(top_k, len(labels))
    results: list[dict[str, Any]] = []
    for path in images:
        # One image at a time: a bad file is reported and the rest still get their answer.
        try:
            pixels = predictor.transform(load_image(path))
        except DataError as e:
            log.warning("skipped: %s", e)
            results.append({"image": str(path), "error": str(e)})
            continue
        logits = predictor.predict(pixels[None])[0].astype(np.float64)
        if bias is not None:
            logits = logits + bias
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        top = np.argsort(-probs, kind="stable")[:k]
        results.append(
            {"image": str(path), "top": [{"label": labels[i], "score": float(probs[i])} for i in top]}
        )
    if as_json:
        print(json.dumps({"predictions": results}))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="predictions")
        table.add_column("image")
        for r in range(k):
            table.add_column(f"#{r + 1}")
        for res in results:
            cells = (
                [f"error: {res['error']}"]
                if "error" in res
                else [f"{t['label']} ({t['score']:.2f})" for t in res["top"]]
            )
            table.add_row(res["image"], *cells)
        Console().print(table)
    if all("error" in r for r in results):
        raise DataError("no image could be read")
    if any(math.isnan(t["score"]) for r in results if "top" in r for t in r["top"]):
        raise DataError("the model produced non-finite scores")


def serve_inference(
    state: Path = typer.Option(
        None, "--state", help="An agent's state dir: serve the adapter it has installed, following rollouts."
    ),
    bundle: Path = typer.Option(
        None, "--bundle", help="Bundle folder (with --state: when the agent was given a folder, not a URL)."
    ),
    adapter: Path = _ADAPTER,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (keep it on loopback)."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="TCP port (0: any free one)."),
    unix: Path = typer.Option(None, "--unix", help="Serve on this Unix socket instead of TCP."),
    labels: str = typer.Option(None, "--labels", help="Default labels, comma-separated (else the bundle's)."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per ONNX Runtime run."),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", min=0.001, help="Largest request body (MiB)."),
    prior_weight: float = _PRIOR,
    open_set: Path = _OPEN_SET,
    open_set_quantile: float = _OPEN_SET_Q,
    device: str = _DEVICE,
    threads: int = _THREADS,
    quiet: bool = _QUIET,
) -> None:
    """Serve the Classifier over local HTTP: GET /health, POST /predict and /embed (docs/inference.md)."""
    import signal
    import sys
    import threading

    from fedclip.device_agent.classifier import Classifier
    from fedclip.device_agent.inference_http import make_server
    from fedclip.device_agent.open_set import OpenSet

    setup_logging(quiet=quiet)
    if state is None and bundle is None:
        raise DataError("give --state DIR (follow an agent) or --bundle DIR [--adapter FILE]")
    if state is not None and adapter is not None:
        raise DataError("--adapter goes with --bundle; with --state the agent's installed adapter is served")
    kw = dict(
        device=device,
        threads=threads,
        batch_size=batch_size,
        prior_weight=prior_weight,
        labels=[x.strip() for x in labels.split(",") if x.strip()] if labels else None,
        open_set=OpenSet(open_set, open_set_quantile) if open_set is not None else None,
    )
    if state is not None:
        clf = Classifier.from_state(state, bundle=bundle, **kw)
    else:
        clf = Classifier.from_bundle(bundle, adapter=adapter, **kw)
    server = make_server(clf, host=host, port=port, unix=unix, max_body=int(max_body_mb * (1 << 20)))

    def stop(signum, frame) -> None:
        # shutdown() waits for serve_forever to return: never from the thread that runs it
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # One line on stderr that scripts (and tests) wait for; the port is the real one with --port 0.
    print(
        f"serving inference on {server.url} (adapter {clf.adapter_version or 'bundle'})",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        clf.close()
    log.info("inference server stopped")
