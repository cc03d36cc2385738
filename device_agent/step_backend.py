"""`StepTrainer`: training with the bundle's portable step graph and any ONNX Runtime build.

The `step` graph (see `fedclip.exporters.step_graph`) does forward, backward and AdamW in one
ordinary ONNX graph, so a plain `onnxruntime.InferenceSession` trains: no training API, no torch.
The trainer keeps the trainable tensors, the AdamW moments and the step counter as numpy arrays and
feeds each step's outputs into the next step. Same public interface as `OrtTrainer`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from fedclip.device_agent.ort_loader import (
    NO_FOLDING,
    Session,
    device_providers,
    lean_session_options,
    onnxruntime,
)
from fedclip.device_agent.shared_weights import add_shared_initializers, shared_initializers
from fedclip.sdk.adapters import AdapterFiles, check_tensors, decode_tensors, encode_tensors
from fedclip.sdk.errors import AdapterError, BackendError, BundleError, DataError
from fedclip.sdk.fsutil import atomic_write
from fedclip.sdk.label_prior import with_zero_bias
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.messages import MAX_PROX_MU

# The step graph's names besides the data inputs; the exporter writes them (exporters/step_graph.py)
# and lists every one in manifest.graphs["step"], which is checked against them on load.
STEP_IN, LR_IN, LOSS_OUT, STEP_OUT = "step", "lr", "loss", "step_out"
EXP_AVG, EXP_AVG_SQ, NEW = ".exp_avg", ".exp_avg_sq", ".new"
# The proximal term's inputs (`prox_mu`, one `<tensor>.anchor` each), last: bundles exported before
# them have the same inputs without this tail, and train as before (without `set_prox`).
PROX_IN, ANCHOR = "prox_mu", ".anchor"
DEFAULT_LR = 1e-3  # what ORT's training artifacts start with, so both backends agree untouched

_CKPT_FORMAT_KEY = "fedclip_step_checkpoint"
_CKPT_FORMAT = "1"
_PARAM, _M, _V = "param/", "exp_avg/", "exp_avg_sq/"
_STEP_KEY = "step"


class StepTrainer(AdapterFiles):
    """One bundle's training session over the `step` and `step_eval` graphs."""

    def __init__(
        self, bundle_dir: str | Path, *, device: str = "auto", threads: int | None = None, verify: bool = True
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = Manifest.load(self.bundle_dir, verify=verify)
        graphs = self.manifest.graphs
        for key in ("step", "step_eval"):
            if key not in graphs:
                raise BundleError(
                    f"{self.bundle_dir}: manifest has no {key!r} graph "
                    "(export the bundle with the step format)"
                )
        if not self.manifest.initial_tensors:
            raise BundleError(f"{self.bundle_dir}: manifest names no initial_tensors file for the step graph")
        self.device, providers = device_providers(device)  # auto: CUDA where installed, else CPU
        self.threads = threads
        self._keep: list = []  # arrays and OrtValues the sessions' initializers point into
        self._names = tuple(t.name for t in self.manifest.trainable)
        # has_prox: the step graph ends with the proximal inputs (bundles exported before them do not)
        self._data_names, self._has_prox = self._check_step_io()
        self._step_sess = self._session(graphs["step"].file, providers)
        self._eval_sess = self._session(graphs["step_eval"].file, providers)
        self._eval_outputs = tuple(graphs["step_eval"].outputs)
        self._initial = self._read_initial()
        self._lr = DEFAULT_LR
        self._prox_mu = np.zeros(1, dtype=np.float32)
        self._anchor: dict[str, np.ndarray] | None = None  # None: each tensor is its own (no pull)
        self._tensors = {n: a.copy() for n, a in self._initial.items()}
        self._step: np.ndarray = np.zeros(1, dtype=np.int64)
        self._exp_avg: dict[str, np.ndarray] = {}
        self._exp_avg_sq: dict[str, np.ndarray] = {}
        self.reset_optimizer()

    # ---- loading ---------------------------------------------------------------------------------
    def _check_step_io(self) -> tuple[tuple[str, ...], bool]:
        """(the data inputs' names, whether the proximal inputs are there), the rest checked."""
        spec = self.manifest.graphs["step"]
        n = len(self._names)
        prox = (PROX_IN, *(t + ANCHOR for t in self._names))
        has_prox = tuple(spec.inputs[len(spec.inputs) - len(prox) :]) == prox
        own = 2 + 3 * n + (len(prox) if has_prox else 0)
        data = tuple(spec.inputs[: len(spec.inputs) - own])
        want_in = (*data, STEP_IN, LR_IN, *self._names, *(t + EXP_AVG for t in self._names))
        want_in += tuple(t + EXP_AVG_SQ for t in self._names) + (prox if has_prox else ())
        want_out = (LOSS_OUT, STEP_OUT, *(t + NEW for t in self._names))
        want_out += tuple(t + EXP_AVG + NEW for t in self._names) + tuple(
            t + EXP_AVG_SQ + NEW for t in self._names
        )
        if tuple(spec.inputs) != want_in or tuple(spec.outputs) != want_out:
            raise BundleError(
                f"{self.bundle_dir}: the step graph's inputs/outputs do not match the manifest's tensors"
            )
        return data, has_prox

    def _session(self, file: str, providers: list[str]) -> Session:
        ort = onnxruntime()
        opts = lean_session_options(self.threads)
        frozen = shared_initializers(self.bundle_dir, self.manifest, file)
        add_shared_initializers(opts, ort, frozen, self._keep)
        path = self.bundle_dir / file
        try:
            return ort.InferenceSession(str(path), opts, providers=providers, disabled_optimizers=NO_FOLDING)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph classes
            raise BackendError(
                f"{path}: ONNX Runtime cannot load the step graph ({_first_line(e)})"
            ) from None

    def _read_initial(self) -> dict[str, np.ndarray]:
        path = self.bundle_dir / str(self.manifest.initial_tensors)  # checked in __init__
        try:
            blob = path.read_bytes()
        except OSError as e:
            raise BundleError(f"{path}: cannot read the initial tensors ({e.strerror or e})") from None
        tensors, _ = decode_tensors(blob, str(path))
        try:
            return check_tensors(tensors, self.manifest.trainable, str(path))
        except AdapterError as e:
            raise BundleError(str(e)) from None

    @property
    def input_names(self) -> tuple[str, ...]:
        return self._data_names

    def _feeds(self, names: tuple[str, ...], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = with_zero_bias(inputs, names, len(self.manifest.task.labels))
        missing = [n for n in names if n not in inputs]
        if missing:
            raise DataError(f"training input {missing[0]!r} is missing (the graph takes {', '.join(names)})")
        return {n: np.ascontiguousarray(inputs[n]) for n in names}

    # ---- steps -----------------------------------------------------------------------------------
    def train_step(self, inputs: Mapping[str, np.ndarray]) -> float:
        """One AdamW step on one batch; returns the batch loss before the step."""
        feeds = self._feeds(self._data_names, inputs)
        feeds[STEP_IN] = self._step
        feeds[LR_IN] = np.array([self._lr], dtype=np.float32)
        for n in self._names:
            feeds[n] = self._tensors[n]
            feeds[n + EXP_AVG] = self._exp_avg[n]
            feeds[n + EXP_AVG_SQ] = self._exp_avg_sq[n]
        if self._has_prox:
            feeds[PROX_IN] = self._prox_mu
            for n in self._names:
                feeds[n + ANCHOR] = self._tensors[n] if self._anchor is None else self._anchor[n]
        try:
            out = self._step_sess.run(None, feeds)
        except Exception as e:
            raise DataError(f"step graph rejected the batch ({_first_line(e)})") from None
        res = dict(zip(self.manifest.graphs["step"].outputs, out, strict=False))
        loss = float(res[LOSS_OUT])
        if not np.isfinite(loss):
            # Keep the last good state: a diverged step would poison every later one.
            raise DataError(f"training loss is {loss}; the step was not applied (lower the learning rate)")
        self._step = res[STEP_OUT]
        for n in self._names:
            self._tensors[n] = res[n + NEW]
            self._exp_avg[n] = res[n + EXP_AVG + NEW]
            self._exp_avg_sq[n] = res[n + EXP_AVG_SQ + NEW]
        return loss

    def eval_step(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = self._feeds(self._data_names, inputs)
        feeds.update(self._tensors)
        try:
            out = self._eval_sess.run(None, feeds)
        except Exception as e:
            raise DataError(f"eval graph rejected the batch ({_first_line(e)})") from None
        return {name: np.asarray(value) for name, value in zip(self._eval_outputs, out, strict=False)}

    def set_lr(self, lr: float) -> None:
        if not (lr > 0 and np.isfinite(lr)):
            raise DataError(f"learning rate must be a positive number, got {lr}")
        self._lr = float(lr)

    @property
    def lr(self) -> float:
        return self._lr

    def set_prox(self, anchor: Mapping[str, np.ndarray] | None, mu: float) -> None:
        """From the next step on, train on the loss plus (mu / 2) ||w - anchor||^2 (the anchor: every
        trainable tensor); `mu = 0` or no anchor turns it off. Bundles exported before the step graph
        had the term cannot."""
        if not (np.isfinite(mu) and 0.0 <= mu <= MAX_PROX_MU):
            raise DataError(f"proximal weight must be a number in [0, {MAX_PROX_MU:g}], got {mu}")
        if not mu or anchor is None:
            self._prox_mu, self._anchor = np.zeros(1, dtype=np.float32), None
            return
        if not self._has_prox:
            raise BackendError(
                f"{self.bundle_dir}: this bundle's step graph has no proximal term (exported by an "
                "earlier fedclip); export it again to train with one"
            )
        self._anchor = {
            k: np.ascontiguousarray(v)
            for k, v in check_tensors(anchor, self.manifest.trainable, "anchor").items()
        }
        self._prox_mu = np.array([mu], dtype=np.float32)

    @property
    def prox_mu(self) -> float:
        """The proximal weight the next step trains with (0: none)."""
        return float(self._prox_mu[0])

    @property
    def step(self) -> int:
        return int(self._step[0])

    def reset_optimizer(self) -> None:
        """Forget the AdamW moments and step count (a new round from a new global adapter)."""
        self._step = np.zeros(1, dtype=np.int64)
        self._exp_avg = {n: np.zeros_like(a) for n, a in self._tensors.items()}
        self._exp_avg_sq = {n: np.zeros_like(a) for n, a in self._tensors.items()}

    # ---- tensors (save_adapter / load_adapter come from AdapterFiles) -------------------------------

    def get_tensors(self, which: Literal["trainable", "exchanged"] = "trainable") -> dict[str, np.ndarray]:
        return {s.name: self._tensors[s.name].copy() for s in self._specs(which)}

    def set_tensors(self, tensors: Mapping[str, np.ndarray], where: str = "adapter") -> None:
        """Overwrite some or all trainable tensors; every one is validated before any is written."""
        checked = check_tensors(tensors, self.manifest.trainable, where, require_all=False)
        for name, arr in checked.items():
            self._tensors[name] = np.ascontiguousarray(arr)

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        """Tensors, AdamW moments, step and lr in one safetensors file, written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {_STEP_KEY: self._step}
        for n in self._names:
            arrays[_PARAM + n] = self._tensors[n]
            arrays[_M + n] = self._exp_avg[n]
            arrays[_V + n] = self._exp_avg_sq[n]
        meta = {_CKPT_FORMAT_KEY: _CKPT_FORMAT, "bundle_id": self.manifest.bundle_id, "lr": repr(self._lr)}
        atomic_write(path, encode_tensors(arrays, meta))
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from `save_checkpoint`: the next step gives what an uninterrupted run would."""
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: checkpoint not found")
        try:
            tensors, meta = decode_tensors(path.read_bytes(), str(path))
        except AdapterError as e:
            raise BundleError(f"{path}: not a step-trainer checkpoint ({e})") from None
        if meta.get(_CKPT_FORMAT_KEY) != _CKPT_FORMAT:
            raise BundleError(
                f"{path}: not a step-trainer checkpoint (format {meta.get(_CKPT_FORMAT_KEY)!r})"
            )
        owner = meta.get("bundle_id", "")
        if owner != self.manifest.bundle_id:
            raise BundleError(f"{path}: checkpoint belongs to bundle {owner[:12] or '?'}, not this bundle")
        try:
            params = check_tensors(_present(tensors, _PARAM, self._names), self.manifest.trainable, str(path))
            exp_avg = check_tensors(_present(tensors, _M, self._names), self.manifest.trainable, str(path))
            exp_avg_sq = check_tensors(_present(tensors, _V, self._names), self.manifest.trainable, str(path))
            step = np.asarray(tensors[_STEP_KEY], dtype=np.int64).reshape(1)
            lr = float(meta.get("lr", self._lr))
        except (AdapterError, KeyError, ValueError, TypeError) as e:
            raise BundleError(f"{path}: checkpoint is incomplete or corrupt ({_first_line(e)})") from None
        self._tensors, self._exp_avg, self._exp_avg_sq, self._step, self._lr = (
            params,
            exp_avg,
            exp_avg_sq,
            step,
            lr,
        )


# ---- backend choice ------------------------------------------------------------------------------
BACKENDS = ("auto", "step", "ort-training")


def _has_training_api() -> bool:
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return False
    return any((Path(p) / "training" / "api").is_dir() for p in spec.submodule_search_locations)


def _has_ort_artifacts(manifest: Manifest) -> bool:
    return all(k in manifest.graphs for k in ("training", "eval", "optimizer"))


def fetch_formats(backend: str) -> tuple[str, ...]:
    """The training formats a device with `backend` can run, in `make_trainer`'s order of preference:
    what `fetch_bundle(formats=...)` downloads, so a device never fetches a format it does not run."""
    if backend == "auto":
        return ("ort-training", "step") if _has_training_api() else ("step",)
    return (backend,)


def make_trainer(bundle_dir: str | Path, backend: str = "auto", **kw):
    """`OrtTrainer` or `StepTrainer` for `bundle_dir`.

    auto: the ORT training API when this onnxruntime has it and the bundle has its artifacts,
    else the step graph. Keyword arguments go to the trainer (device, threads, verify).
    """
    if backend not in BACKENDS:
        raise BackendError(f"backend {backend!r} is not supported (choose from {', '.join(BACKENDS)})")
    if backend == "auto":
        manifest = Manifest.load(bundle_dir, verify=kw.get("verify", True))
        present = manifest.present_formats(bundle_dir)  # a bundle fetched for one format has only it
        if _has_training_api() and "ort-training" in present:
            backend = "ort-training"
        elif "step" in present:
            backend = "step"
        elif _has_ort_artifacts(manifest):
            raise BackendError(
                f"{bundle_dir}: the bundle has only ORT training artifacts and this onnxruntime has no "
                "training API; "
                "install onnxruntime-training or export the bundle with the step format"
            )
        else:
            raise BundleError(f"{bundle_dir}: the bundle has no training graphs")
        kw["verify"] = False  # just verified
    else:
        manifest = Manifest.load(bundle_dir, verify=kw.get("verify", True))
        if backend not in manifest.formats:
            have = ", ".join(manifest.formats) or "none"
            raise BackendError(
                f"{bundle_dir}: --backend {backend} cannot train this bundle (it was exported with "
                f"format {have}); use --backend auto or re-export with --format {backend} or both"
            )
        kw["verify"] = False  # just verified
    if backend == "step":
        return StepTrainer(bundle_dir, **kw)
    from fedclip.device_agent.trainer import OrtTrainer

    return OrtTrainer(bundle_dir, **kw)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _present(tensors: Mapping[str, np.ndarray], prefix: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The tensors of `names` stored under `prefix`; a missing one is reported by check_tensors."""
    return {n: tensors[prefix + n] for n in names if prefix + n in tensors}
