"""`Classifier`: the application's inference API on the device, following the fleet's adapter.

    clf = Classifier.from_state("/var/lib/fedclip/agent")        # what the agent installed
    clf.predict([pil_image]).top(3)                               # the bundle's labels
    clf.predict(frames, labels=["cat", "dog", "forklift"])        # any labels (open vocabulary)
    clf.embed_images(frames), clf.embed_texts(["a red car"])      # L2-normalized embeddings

Torch-free, ONNX Runtime only. `from_state` follows the adapter the agent has installed for inference
(`installed_adapter`, the one place that reads it): a watcher thread notices a change of the agent's
state file, builds a complete `Predictor` for the new adapter (sessions open, weights loaded) and
only then swaps one reference under a lock, so a request is served wholly by the old adapter or
wholly by the new one, never by a half-loaded one; a rollback is a change like any other. Each call
takes the current predictor once at its start and uses it for every batch and for the label
embeddings, and its result names the adapter version that produced it.

With `open_set=OpenSet(train_dir)` the label prior of a balanced-softmax adapter is added only to
images that look like the device's own training images (`device_agent.open_set`, refitted with each
adapter before it serves); the others are scored, without the prior, by the adapter's fallback: the
fleet's global adapter a rollout delivered beside a personalized one (`rollout start --fallback`;
`fallback=` for a fixed adapter), else the bundle's own model.

Label embeddings go through the bundle's text encoder graph with the installed text-tower adapter,
are computed once per (adapter version, prompts) and cached; logits are CLIP's
`logit_scale * cos(image, text)`, the formula the training graph uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from fedclip.device_agent.open_set import Gate, OpenSet, gate_for
from fedclip.device_agent.predictions import Predictions, SwapStats
from fedclip.device_agent.predictor import Predictor
from fedclip.sdk.adapters import AdapterMeta, load_adapter
from fedclip.sdk.errors import DataError, FedclipError, StateError
from fedclip.sdk.label_prior import inference_bias
from fedclip.sdk.ledger import file_stamp, installed, installed_adapter, state_stamp
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.preprocess import ImageTransform, load_image

log = logging.getLogger(__name__)

_TEXT_CACHE = 64  # label sets kept per classifier (a few per adapter version is the usual load)


@dataclass(frozen=True)
class _Served:
    """What one adapter version serves with: built completely before it becomes current."""

    version: str | None
    predictor: Predictor
    # Added to the logits over the bundle's own labels: `prior_weight` x the label prior a
    # balanced-softmax adapter carries in its metadata (`sdk.label_prior`); None: nothing.
    bias: np.ndarray | None = None
    # With `open_set`: which images the prior applies to, fitted on the device's own images under
    # this adapter (`device_agent.open_set`); the others are scored by `away`, without the prior.
    gate: Gate | None = None
    # The model the gate sends images to: the adapter's fallback (the fleet's global adapter,
    # delivered with a personalized one), else the bundle's own (shared by every served adapter).
    away: _Served | None = None
    fallback: bool = False  # this is a fallback: its label embeddings are cached apart from a version's

    @property
    def text_key(self) -> tuple[str | None, bool]:
        return self.version, self.fallback


class Classifier:
    """Thread-safe image classification and embedding with one bundle and the adapter in use."""

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        adapter: str | Path | None = None,
        labels: Sequence[str] | None = None,
        prompt: str | None = None,
        device: str = "auto",
        threads: int | None = None,
        batch_size: int = 32,
        prior_weight: float = 1.0,
        open_set: OpenSet | None = None,
        fallback: str | Path | None = None,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        if not (np.isfinite(prior_weight) and 0 <= prior_weight <= 10):
            raise DataError(f"prior_weight must be in [0, 10], got {prior_weight}")
        self.prior_weight = float(prior_weight)
        self.bundle_dir = Path(bundle_dir)
        self.manifest = Manifest.load(self.bundle_dir)
        self.device, self.threads, self.batch_size = device, threads, batch_size
        self.prompt = prompt or self.manifest.task.prompt
        self.labels = tuple(labels) if labels is not None else None
        if self.labels is None and self.manifest.task.kind != "classify":
            log.info("contrastive bundle: pass labels= to predict (embeddings work without)")
        self.open_set = open_set
        self._own_images = open_set.own_images(self.manifest) if open_set is not None else None
        self._base: _Served | None = None  # the bundle's own model, for the images a gate sends away
        self._lock = threading.Lock()
        self._text_cache: OrderedDict[tuple, tuple[np.ndarray, float]] = OrderedDict()
        self._state_dir: Path | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._stamp: tuple[int, int] | None = None
        self._swaps, self._load_failures = 0, 0
        self._sent_away = 0  # images the open-set gate gave to the bundle's own model
        self._last_swap: float | None = None
        self._switched = threading.Condition(self._lock)
        version, tensors, meta = None, None, None
        if adapter is not None:
            tensors, meta = self._load(adapter, DataError)
            version = meta.version or None
        if fallback is not None and open_set is None:
            raise DataError("fallback is where the open-set gate sends images: pass open_set too")
        self._served = self._build(version, tensors, meta, str(adapter), fallback)
        # (version, its fallback file's identity): what `refresh` compares the agent's ledger with
        self._served_key: tuple = (version, None)
        self.device = self._served.predictor.device  # auto resolved: cpu or cuda, for every later build
        if self.labels is not None:
            self._text_features(self._served, self._prompts(self.labels, None))  # fail early, warm cache

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_bundle(cls, bundle: str | Path, adapter: str | Path | None = None, **kw: Any) -> Classifier:
        """A fixed adapter (a `.safetensors` file) or the bundle's own; it never switches."""
        return cls(bundle, adapter=adapter, **kw)

    @classmethod
    def from_state(
        cls, state_dir: str | Path, bundle: str | Path | None = None, *, poll: float = 0.5, **kw: Any
    ) -> Classifier:
        """Follow the adapter an agent with state dir `state_dir` has installed, switching within
        `poll` seconds of a change. `bundle` defaults to the one the agent downloaded into
        `<state>/bundles/<bundle id>` (agents started with a bundle URL)."""
        if kw.get("fallback") is not None:
            raise DataError("from_state serves the agent's own fallback; fallback= is for fixed adapters")
        state_dir = Path(state_dir)
        bundle_id, _, _ = installed_adapter(state_dir)
        if bundle is None:
            bundle = state_dir / "bundles" / bundle_id
            if not bundle.is_dir():
                raise StateError(
                    f"{state_dir}: the agent's bundle is not in {bundle.parent}; pass the bundle folder"
                )
        clf = cls(bundle, **kw)
        if clf.manifest.bundle_id != bundle_id:
            raise StateError(f"{bundle}: not the bundle of the agent's state dir ({bundle_id[:12]})")
        clf._state_dir = state_dir
        clf.refresh()
        clf._swaps, clf._last_swap = 0, None  # loading the installed adapter at the start is no swap
        clf._watcher = threading.Thread(
            target=clf._watch, args=(poll,), name="fedclip-classifier", daemon=True
        )
        clf._watcher.start()
        return clf

    def _load(self, path: str | Path, error: type[FedclipError]) -> tuple[dict[str, np.ndarray], AdapterMeta]:
        tensors, meta = load_adapter(path)
        if meta.bundle_id != self.manifest.bundle_id:
            raise error(f"{path}: adapter was made for bundle {meta.bundle_id[:12]}, not this one")
        return tensors, meta

    def _predictor(self, tensors: dict[str, np.ndarray] | None) -> Predictor:
        predictor = Predictor(
            self.bundle_dir, adapter=tensors, device=self.device, threads=self.threads, manifest=self.manifest
        )
        return predictor.load()

    def _build(
        self,
        version: str | None,
        tensors: dict[str, np.ndarray] | None,
        meta: AdapterMeta | None = None,
        where: str = "adapter",
        fallback: Path | str | None = None,
    ) -> _Served:
        n_labels = len(self.manifest.task.labels)
        counts = meta.label_prior if meta is not None else ()
        bias = inference_bias(counts, n_labels, self.prior_weight, where)  # checked before loading
        predictor = self._predictor(tensors)
        if self._own_images is None or bias is None:  # no gate, or no prior: nothing to gate
            return _Served(version=version, predictor=predictor, bias=bias)
        assert self.open_set is not None
        gate = gate_for(predictor, self._own_images, self.open_set.quantile, self.batch_size, where)
        if fallback is not None:  # the fleet's adapter, for this adapter's unfamiliar images only
            fb_tensors, fb_meta = self._load(fallback, StateError if self._state_dir else DataError)
            name = fb_meta.version or Path(fallback).name
            away = _Served(name, self._predictor(fb_tensors), fallback=True)
        else:
            if self._base is None:
                self._base = _Served(version=None, predictor=self._predictor(None))
            away = self._base
        return _Served(version=version, predictor=predictor, bias=bias, gate=gate, away=away)

    # ---- following the agent -------------------------------------------------------------------
    @property
    def state_dir(self) -> Path | None:
        """The agent state dir this classifier follows (None: a fixed adapter)."""
        return self._state_dir

    @property
    def providers(self) -> list[str]:
        """The ONNX Runtime execution providers requests run on now, e.g. CUDA then CPU."""
        return self._served.predictor.providers

    @property
    def label_prior(self) -> bool:
        """Whether predictions over the bundle's labels add the adapter's label prior now."""
        return self._served.bias is not None

    @property
    def transform(self) -> ImageTransform:
        """The bundle's image preprocessing (PIL image -> float32 [3, S, S]), for `Dataset.batches`."""
        return self._served.predictor.transform

    @property
    def open_set_gate(self) -> Gate | None:
        """The open-set gate of the adapter in use (None: off, or nothing to gate: no prior)."""
        return self._served.gate

    @property
    def adapter_version(self) -> str | None:
        """The adapter version requests are served with now (None: the bundle's own)."""
        return self._served.version

    def refresh(self) -> bool:
        """Switch to the agent's installed adapter if it changed; True when it switched."""
        if self._state_dir is None:
            return False
        stamp = state_stamp(self._state_dir)
        now = installed(self._state_dir)
        self._stamp = stamp
        # with a gate, a fallback delivered for the version in use (a second rollout) is a change too
        key = (now.version, file_stamp(now.fallback) if self._own_images is not None else None)
        if key == self._served_key:
            return False
        if now.bundle_id != self.manifest.bundle_id:
            raise StateError(
                f"{self._state_dir}: the agent moved to bundle {now.bundle_id[:12]}; start a new Classifier"
            )
        version, path = now.version, now.file
        tensors, meta = self._load(path, StateError) if path is not None else (None, None)
        try:
            served = self._build(version, tensors, meta, str(path), now.fallback)  # complete before visible
        except (FedclipError, OSError) as e:
            if now.fallback is None:
                raise
            # the fallback is the gate's second opinion: a bad one must not keep the adapter out
            self._count_failure()
            log.error(
                "open-set fallback %s not loaded (%s); the bundle's own model takes its place",
                now.fallback,
                e,
            )
            served = self._build(version, tensors, meta, str(path), None)
        self._served_key = key
        with self._lock:
            old, self._served = self._served, served
            self._swaps, self._last_swap = self._swaps + 1, time.time()
            self._switched.notify_all()
        log.info("inference switched from adapter %s to %s", old.version, version)
        return True

    def wait_for(self, version: str | None, timeout: float) -> bool:
        """Block until requests are served by `version` (or `timeout` seconds pass)."""
        with self._lock:
            return self._switched.wait_for(lambda: self._served.version == version, timeout)

    def _watch(self, poll: float) -> None:
        assert self._state_dir is not None  # only a classifier made from a state dir watches
        while not self._stop.wait(poll):
            if state_stamp(self._state_dir) == self._stamp:
                continue
            try:
                self.refresh()
            except FedclipError as e:  # a bad adapter file: keep serving the current one
                self._count_failure()
                log.error("keeping adapter %s: %s", self._served.version, e)
            except OSError as e:
                self._count_failure()
                log.error("keeping adapter %s: cannot read the state dir (%s)", self._served.version, e)

    def _count_failure(self) -> None:
        with self._lock:
            self._load_failures += 1

    def swap_stats(self) -> SwapStats:
        with self._lock:
            served = self._served
            away = served.away.version if served.away is not None else None
            return SwapStats(
                served.version, self._swaps, self._load_failures, self._last_swap, self._sent_away, away
            )

    def close(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)

    def __enter__(self) -> Classifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- inputs --------------------------------------------------------------------------------
    def _prompts(self, labels: Sequence[str], prompt: str | None) -> tuple[str, ...]:
        template = prompt or self.prompt
        if "{}" not in template:
            raise DataError(f"prompt must contain '{{}}' for the label, got {template!r}")
        if not labels or any(not isinstance(x, str) or not x.strip() for x in labels):
            raise DataError("labels must be a non-empty list of non-empty strings")
        return tuple(template.format(x) for x in labels)

    def _text_features(self, served: _Served, texts: tuple[str, ...]) -> tuple[np.ndarray, float]:
        """(normalized text embeddings, logit scale) of `texts` under `served`'s adapter, cached."""
        key = (served.text_key, texts)
        with self._lock:
            hit = self._text_cache.get(key)
            if hit is not None:
                self._text_cache.move_to_end(key)
                return hit
        embeds, scale = served.predictor.encode_texts(list(texts))
        value = (_normalize(embeds), scale)
        with self._lock:
            self._text_cache[key] = value
            while len(self._text_cache) > _TEXT_CACHE:
                self._text_cache.popitem(last=False)
        return value

    # ---- API -----------------------------------------------------------------------------------
    def predict(
        self, images: Iterable[Any], labels: Sequence[str] | None = None, prompt: str | None = None
    ) -> Predictions:
        """Classify images against `labels` (default: the constructor's, else the bundle's own)."""
        served = self._served  # one adapter for the whole call
        labels = tuple(labels) if labels is not None else self.labels
        pixels = served.predictor.pixels(images)
        own = labels is None or (
            labels == self.manifest.task.labels and (prompt or self.prompt) == self.manifest.task.prompt
        )
        if labels is None and self.manifest.task.kind != "classify":
            raise DataError("this bundle is contrastive: pass labels= (the texts to classify against)")
        text = None if own or labels is None else self._text_features(served, self._prompts(labels, prompt))
        chunks = []
        for start in range(0, len(pixels), self.batch_size):
            logits, embeds = served.predictor.image_outputs(pixels[start : start + self.batch_size])
            if text is not None or logits is None:
                if text is None:  # own labels, but the graph gave no logits: classify via embeddings
                    text = self._text_features(served, self._prompts(labels or (), prompt))
                feats, scale = text
                logits = scale * _normalize(embeds) @ feats.T
            if own and served.bias is not None:  # the prior is over the bundle's labels only
                logits = logits + served.bias
                if served.gate is not None:
                    away_logits = partial(self._away_logits, served, pixels[start : start + self.batch_size])
                    logits, sent = served.gate.route(logits, embeds, away_logits)
                    with self._lock:
                        self._sent_away += sent
            chunks.append(np.asarray(logits, dtype=np.float32))
        labels = labels if labels is not None else self.manifest.task.labels
        return Predictions(
            labels=tuple(labels), logits=np.concatenate(chunks), adapter_version=served.version
        )

    def _away_logits(self, served: _Served, pixels: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The logits over the bundle's labels of `served`'s fallback (or the bundle's own model) for
        `pixels[rows]`, without a prior: for the images an open-set gate sends away."""
        away = served.away
        assert away is not None  # built with every gate
        out, feats = away.predictor.image_outputs(pixels[rows])
        if out is None:  # a graph without logits: through its label embeddings
            text, scale = self._text_features(away, self._prompts(self.manifest.task.labels, None))
            out = scale * _normalize(feats) @ text.T
        return out

    def predict_files(
        self, paths: Sequence[str | Path], labels: Sequence[str] | None = None, prompt: str | None = None
    ) -> Predictions:
        """`predict` on image files; an unreadable file is a DataError naming it."""
        return self.predict([load_image(p) for p in paths], labels=labels, prompt=prompt)

    def embed_images(self, images: Iterable[Any]) -> np.ndarray:
        """L2-normalized image embeddings [B, D] with the vision adapter in use."""
        served = self._served
        pixels = served.predictor.pixels(images)
        out = [
            served.predictor.image_outputs(pixels[s : s + self.batch_size])[1]
            for s in range(0, len(pixels), self.batch_size)
        ]
        return _normalize(np.concatenate(out))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        """L2-normalized text embeddings [N, D] with the text adapter in use (cached per version)."""
        texts = tuple(texts)
        if not texts or any(not isinstance(t, str) for t in texts):
            raise DataError("texts must be a non-empty list of strings")
        return self._text_features(self._served, texts)[0]


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


__all__ = ["Classifier", "Predictions", "SwapStats", "installed_adapter"]
