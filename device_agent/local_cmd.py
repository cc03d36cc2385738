"""`fedclip-agent train | eval | predict`: offline use of a bundle, no broker needed (serving: `serve_cmd`).

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

from fedclip.device_agent import cli_options as opt
from fedclip.sdk.adapters import AdapterMeta
from fedclip.sdk.cli import setup_logging
from fedclip.sdk.errors import DataError

log = logging.getLogger(__name__)


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
    bundle: Path = opt.BUNDLE,
    data: Path = opt.DATA,
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
    adapter: Path = opt.ADAPTER,
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
    device: str = opt.DEVICE,
    backend: str = opt.BACKEND,
    threads: int = opt.THREADS,
    cache_dir: Path = opt.CACHE,
    quiet: bool = opt.QUIET,
    as_json: bool = opt.JSON,
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
    bundle: Path = opt.BUNDLE,
    data: Path = opt.DATA,
    adapter: Path = opt.ADAPTER,
    holdout: float = typer.Option(
        0.0,
        "--holdout",
        min=0.0,
        max=0.99,
        help="Evaluate only the held-out part `train --holdout` kept out.",
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="Images per step."),
    prior_weight: float = opt.PRIOR,
    open_set: Path = opt.OPEN_SET,
    open_set_quantile: float = opt.OPEN_SET_Q,
    open_set_fallback: Path = opt.OPEN_SET_FALLBACK,
    device: str = opt.DEVICE,
    backend: str = opt.BACKEND,
    threads: int = opt.THREADS,
    cache_dir: Path = opt.CACHE,
    quiet: bool = opt.QUIET,
    as_json: bool = opt.JSON,
) -> None:
    """Evaluate loss and accuracy of an adapter on local labelled data (accuracy as the device's
    inference scores it: with a balanced-softmax adapter's label prior x --prior-weight; with
    --open-set, accuracy only, as the gated `Classifier` answers)."""
    from fedclip.device_agent.batches import batch_source
    from fedclip.device_agent.loops import evaluate

    if open_set_fallback is not None and open_set is None:
        raise DataError("--open-set-fallback is where the gate sends images: give --open-set too")
    if open_set is not None:
        from fedclip.device_agent.open_set import OpenSet

        gate = OpenSet(open_set, open_set_quantile)
        setup_logging(quiet=quiet or as_json)
        metrics = _gated_accuracy(
            bundle, (adapter, open_set_fallback), data, holdout, gate, prior_weight, device, threads
        )
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


def _gated_accuracy(bundle: Path, adapters: tuple[Path | None, Path | None], data: Path, holdout: float, gate,
                    prior_weight: float, device: str, threads: int | None) -> dict:  # fmt: skip
    """`eval --open-set`: the accuracy of the `Classifier` with the open-set gate on `data`;
    `adapters`: (the adapter, its fallback)."""
    from fedclip.device_agent.classifier import Classifier
    from fedclip.device_agent.loops import classifier_hits
    from fedclip.sdk.manifest import Manifest

    dataset, held_out = _open_data(data, Manifest.load(bundle), holdout)
    dataset = held_out if held_out is not None else dataset
    kw = dict(open_set=gate, prior_weight=prior_weight, device=device, threads=threads)
    with Classifier.from_bundle(bundle, adapters[0], fallback=adapters[1], **kw) as clf:
        hits, n = classifier_hits(clf, dataset)
        stats = clf.swap_stats()
        on, prior = clf.open_set_gate is not None, clf.label_prior
    if not n:
        raise DataError(f"{data}: no readable images to evaluate")
    return {"accuracy": hits / n, "num_samples": n, "label_prior": prior, "open_set": on,
            "open_set_sent_away": stats.open_set_sent_away, "open_set_fallback": stats.open_set_fallback,
            "skipped_images": len(dataset.skipped)}  # fmt: skip


def predict(
    images: list[Path] = typer.Argument(..., help="Image files to classify."),
    bundle: Path = opt.BUNDLE,
    adapter: Path = opt.ADAPTER,
    top_k: int = typer.Option(3, "--top-k", min=1, help="Labels to show per image."),
    prior_weight: float = opt.PRIOR,
    device: str = opt.DEVICE,
    threads: int = opt.THREADS,
    quiet: bool = opt.QUIET,
    as_json: bool = opt.JSON,
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
