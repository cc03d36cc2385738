"""`OrtTrainer`: torch-free on-device training of a bundle with ONNX Runtime's training API.

The bundle's manifest is the only source of graph input names and tensor names/shapes (habit 3);
the ORT checkpoint holds every parameter, and only the adapter tensors are trainable.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from fedclip.device_agent.heap import fix_mmap_threshold
from fedclip.device_agent.ort_loader import device_providers, session_options, training_api
from fedclip.sdk.adapters import AdapterFiles, check_tensors
from fedclip.sdk.errors import BackendError, BundleError, DataError
from fedclip.sdk.fsutil import atomic_produce
from fedclip.sdk.label_prior import with_zero_bias
from fedclip.sdk.manifest import Manifest

_BUNDLE_PROPERTY = "fedclip_bundle_id"
_LR_PROPERTY = "fedclip_lr"
_REQUIRED_GRAPHS = ("training", "eval", "optimizer")


class OrtTrainer(AdapterFiles):
    """One bundle's training session: train/eval steps, adapter tensors in and out, checkpoints."""

    def __init__(
        self, bundle_dir: str | Path, *, device: str = "auto", threads: int | None = None, verify: bool = True
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = Manifest.load(self.bundle_dir, verify=verify)
        for key in _REQUIRED_GRAPHS:
            if key not in self.manifest.graphs:
                raise BundleError(
                    f"{self.bundle_dir}: manifest has no {key!r} graph; this bundle cannot train"
                )
        self.device = device_providers(device)[0]  # auto: cuda where installed, else cpu
        self.threads = threads
        self._api = training_api()
        fix_mmap_threshold()  # every reset_optimizer reopens the stack: without it the heap grows a round
        self._lr: float | None = None
        self._open(self._initial_checkpoint())

    # ---- sessions --------------------------------------------------------------------------------
    def _open(self, checkpoint: Path) -> None:
        graphs = self.manifest.graphs
        try:
            state = self._api.CheckpointState.load_checkpoint(str(checkpoint))
        except RuntimeError as e:
            raise BundleError(f"{checkpoint}: cannot load checkpoint ({_first_line(e)})") from None
        try:
            module = self._api.Module(
                str(self.bundle_dir / graphs["training"].file),
                state,
                str(self.bundle_dir / graphs["eval"].file),
                device=self.device,
                session_options=session_options(self.threads),
            )
            optimizer = self._api.Optimizer(str(self.bundle_dir / graphs["optimizer"].file), module)
        except RuntimeError as e:
            raise BackendError(
                f"{self.bundle_dir}: ONNX Runtime cannot load the training graphs ({_first_line(e)})"
            ) from None
        missing = [t.name for t in self.manifest.trainable if t.name not in state.parameters]
        if missing:
            raise BundleError(f"{self.bundle_dir}: checkpoint lacks trainable tensor {missing[0]!r}")
        self._state, self._module, self._optimizer = state, module, optimizer
        self._train_io = (tuple(module.train().input_names()), tuple(module.output_names()))
        self._eval_io = (tuple(module.eval().input_names()), tuple(module.output_names()))
        if self._lr is not None:
            optimizer.set_learning_rate(self._lr)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.manifest.graphs["training"].inputs)

    def _feeds(self, names: tuple[str, ...], inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        inputs = with_zero_bias(inputs, names, len(self.manifest.task.labels))
        missing = [n for n in names if n not in inputs]
        if missing:
            raise DataError(f"training input {missing[0]!r} is missing (the graph takes {', '.join(names)})")
        return [np.ascontiguousarray(inputs[n]) for n in names]

    # ---- steps -----------------------------------------------------------------------------------
    def train_step(self, inputs: Mapping[str, np.ndarray]) -> float:
        """One optimizer step on one batch; returns the batch loss before the step."""
        names, outputs = self._train_io
        feeds = self._feeds(names, inputs)
        self._module.train()
        out = self._module(*feeds)
        out = out if isinstance(out, tuple) else (out,)
        self._optimizer.step()
        self._module.lazy_reset_grad()
        loss = float(np.asarray(out[outputs.index("loss") if "loss" in outputs else 0]))
        return loss

    def eval_step(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, outputs = self._eval_io
        feeds = self._feeds(names, inputs)
        self._module.eval()
        out = self._module(*feeds)
        out = out if isinstance(out, tuple) else (out,)
        return {name: np.asarray(value) for name, value in zip(outputs, out, strict=False)}

    def set_lr(self, lr: float) -> None:
        if not (lr > 0 and np.isfinite(lr)):
            raise DataError(f"learning rate must be a positive number, got {lr}")
        self._lr = float(lr)
        self._optimizer.set_learning_rate(self._lr)

    @property
    def lr(self) -> float:
        return float(self._optimizer.get_learning_rate())

    def set_prox(self, anchor: Mapping[str, np.ndarray] | None, mu: float) -> None:
        """The step backend's proximal term (`StepTrainer.set_prox`): ORT's training artifacts fix the
        loss and the optimizer at export, so only `mu = 0` (off) is accepted here."""
        if mu:
            raise BackendError(
                f"{self.bundle_dir}: the ORT training backend cannot add a proximal term; use --backend step"
            )

    def _initial_checkpoint(self) -> Path:
        if not self.manifest.checkpoint:
            raise BundleError(f"{self.bundle_dir}: manifest names no ORT training checkpoint")
        return self.bundle_dir / self.manifest.checkpoint

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moments (a new round from a new global adapter), keep the tensors.
        ORT's API cannot zero them in place, so the stack is opened again (`device_agent.heap` keeps
        that from growing the process's heap)."""
        tensors = self.get_tensors("trainable")
        self._open(self._initial_checkpoint())
        self.set_tensors(tensors)

    # ---- tensors ---------------------------------------------------------------------------------
    def get_tensors(self, which: Literal["trainable", "exchanged"] = "trainable") -> dict[str, np.ndarray]:
        params = self._state.parameters
        return {s.name: np.array(params[s.name].data, copy=True) for s in self._specs(which)}

    def set_tensors(self, tensors: Mapping[str, np.ndarray], where: str = "adapter") -> None:
        """Overwrite some or all trainable tensors; every one is validated before any is written."""
        checked = check_tensors(tensors, self.manifest.trainable, where, require_all=False)
        params = self._state.parameters
        for name, arr in checked.items():
            params[name] = np.ascontiguousarray(arr)

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, path: str | Path) -> Path:
        """Tensors and optimizer state, written atomically so a crash never leaves half a file."""
        self._state.properties[_BUNDLE_PROPERTY] = self.manifest.bundle_id
        self._state.properties[_LR_PROPERTY] = float(self.lr)
        return atomic_produce(
            path,
            lambda tmp: self._api.CheckpointState.save_checkpoint(
                self._state, str(tmp), include_optimizer_state=True
            ),
        )

    def load_checkpoint(self, path: str | Path) -> None:
        """Resume from `save_checkpoint`: the next step gives what an uninterrupted run would."""
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path}: checkpoint not found")
        try:
            probe = self._api.CheckpointState.load_checkpoint(str(path))
        except RuntimeError as e:
            raise BundleError(f"{path}: not a training checkpoint ({_first_line(e)})") from None
        props = probe.properties
        owner = props[_BUNDLE_PROPERTY] if _BUNDLE_PROPERTY in props else ""
        if owner != self.manifest.bundle_id:
            raise BundleError(
                f"{path}: checkpoint belongs to bundle {str(owner)[:12] or '?'}, not this bundle"
            )
        del probe
        self._lr = float(props[_LR_PROPERTY]) if _LR_PROPERTY in props else self._lr
        self._open(path)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
