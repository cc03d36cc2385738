"""Load ONNX Runtime (and its on-device training API) without importing torch.

The training wheels of onnxruntime check for ORTModule at import time
(`onnxruntime.capi.onnxruntime_validation` imports `onnxruntime.training.ortmodule`), and
`onnxruntime.training/__init__` imports the torch-based tooling; both pull torch into the process
whenever torch is installed. A device agent must stay torch-free, so while importing we put a bare
package module in place of `onnxruntime.training` (same `__path__`, no `__init__` run) and block
`ortmodule`; `onnxruntime.training.api` only needs the C bindings. Afterwards the stand-ins are removed
again so a process that also exports (tests, the coordinator) can still import the real package.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fedclip.sdk.errors import BackendError

# auto: CUDA where this onnxruntime build has the CUDA provider, else the CPU (choose_providers).
DEVICES = ("auto", "cpu", "cuda")
CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
_PROVIDER = {"cpu": CPU, "cuda": CUDA}

_ort: Any = None
_api: Any = None
_builds_checked = False

# pip distributions that all install the same `onnxruntime` package: with two of them in one
# environment the files of one overwrite the other's and neither works as built.
ORT_BUILDS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-training", "onnxruntime-training-cpu")


def installed_ort_builds() -> list[str]:
    """The onnxruntime builds installed where this interpreter looks (sorted `name==version`)."""
    from importlib.metadata import distributions

    found: dict[str, str] = {}
    for dist in distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in ORT_BUILDS:
            found.setdefault(name, f"{name}=={dist.version}")
    return sorted(found.values())


def check_single_build() -> None:
    """BackendError when more than one onnxruntime build is installed (they break each other)."""
    global _builds_checked
    if _builds_checked:
        return
    builds = installed_ort_builds()
    if len(builds) > 1:
        raise BackendError(
            f"{' and '.join(builds)} are installed together; they overwrite each other's `onnxruntime` "
            "package. Use separate venvs: pip install 'fedclip[agent]' (or another agent-* extra) on "
            "devices, 'fedclip[coordinator]' for the coordinator"
        )
    _builds_checked = True


def _find_root() -> str:
    check_single_build()
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(
            "onnxruntime is not installed; install the agent extra: pip install 'fedclip[agent]'"
        )
    return list(spec.submodule_search_locations)[0]


def _import_without_torch(import_fn):
    """Run `import_fn` with `onnxruntime.training` stood in by a bare package (see module doc)."""
    if "onnxruntime.training" in sys.modules and sys.modules["onnxruntime.training"] is not None:
        return import_fn()  # the real package is already there (an exporting process): torch is in too
    training_dir = os.path.join(_find_root(), "training")
    stub = types.ModuleType("onnxruntime.training")
    stub.__path__ = [training_dir]
    stub.__package__ = "onnxruntime.training"
    before = {n for n in sys.modules if n.startswith("onnxruntime.training")}
    sys.modules["onnxruntime.training"] = stub
    # None in sys.modules makes that import fail at once (the import system's documented block)
    sys.modules["onnxruntime.training.ortmodule"] = None  # type: ignore[assignment]  # see above
    try:
        return import_fn()
    finally:
        # Forget everything imported under the stand-in (the classes we hold keep their modules
        # alive), so a later `import onnxruntime.training...` loads the real package from scratch.
        for name in [n for n in sys.modules if n.startswith("onnxruntime.training") and n not in before]:
            del sys.modules[name]
        parent = sys.modules.get("onnxruntime")
        if parent is not None and getattr(parent, "training", None) is stub:
            delattr(parent, "training")


class NodeArg(Protocol):
    name: str


class Session(Protocol):
    """What fedclip uses of an `onnxruntime.InferenceSession` (onnxruntime has no type information)."""

    def run(self, output_names: Sequence[str] | None, input_feed: Mapping[str, Any]) -> list[Any]: ...

    def get_inputs(self) -> list[NodeArg]: ...

    def get_outputs(self) -> list[NodeArg]: ...

    def get_providers(self) -> list[str]: ...


def onnxruntime() -> Any:
    """The `onnxruntime` module, imported without torch."""
    global _ort
    if _ort is None:
        check_single_build()
        try:
            _ort = _import_without_torch(lambda: importlib.import_module("onnxruntime"))
        except ImportError as e:
            raise BackendError(f"cannot import onnxruntime ({e})") from None
    return _ort


@dataclass(frozen=True)
class TrainingApi:
    CheckpointState: Any
    Module: Any
    Optimizer: Any


def training_api() -> TrainingApi:
    """`CheckpointState`, `Module`, `Optimizer` of `onnxruntime.training.api`, torch-free."""
    global _api
    if _api is None:
        onnxruntime()
        if not os.path.isdir(os.path.join(_find_root(), "training", "api")):
            raise BackendError(
                "this onnxruntime has no on-device training API; use the step backend (--backend step) "
                "or a venv with the training build (pip install 'fedclip[agent-ort-training]')"
            )
        try:
            mod = _import_without_torch(lambda: importlib.import_module("onnxruntime.training.api"))
        except ImportError as e:
            raise BackendError(f"cannot load onnxruntime.training.api ({e})") from None
        _api = TrainingApi(mod.CheckpointState, mod.Module, mod.Optimizer)
    return _api


def choose_providers(device: str, available: Sequence[str]) -> list[str]:
    """The execution providers, in ORT's order of preference, for `device` on a build that has
    `available` (`onnxruntime.get_available_providers()`). Pure: tested with made-up lists.

    `cuda` (and `auto` when the build has CUDA): CUDA first, then the CPU for nodes without a CUDA
    kernel (rather than failing the session). `auto` without CUDA, and `cpu`: the CPU only. `cuda`
    on a build without it is a BackendError saying what to install.
    """
    if device not in DEVICES:
        raise BackendError(f"device {device!r} is not supported (choose from {', '.join(DEVICES)})")
    if device == "auto":
        device = "cuda" if CUDA in available else "cpu"
    provider = _PROVIDER[device]
    if provider not in available:
        raise BackendError(
            f"--device {device} needs {provider}, but this onnxruntime has only {', '.join(available)} "
            "(install a CUDA build in a fresh venv: pip install 'fedclip[agent-cuda]', or "
            "'fedclip[agent-ort-training-cuda]' for the ORT training API)"
        )
    return [provider] if provider == CPU else [provider, CPU]


def device_providers(device: str) -> tuple[str, list[str]]:
    """(`cpu` or `cuda`, the providers) for `device` on the installed onnxruntime (`auto` resolved)."""
    providers = choose_providers(device, onnxruntime().get_available_providers())
    return ("cuda" if providers[0] == CUDA else "cpu"), providers


def session_options(threads: int | None = None) -> Any:
    """SessionOptions with `threads` intra-op threads (None: ORT's default, one per core)."""
    opts = onnxruntime().SessionOptions()
    # Adapter values are overridable graph inputs with initializers, which ORT warns about once per
    # tensor at every session start; that is by design (see exporters/onnx_export.py), so errors only.
    opts.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise BackendError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


# ConstantFolding turns Transpose(W) of a frozen weight into a new private W^T (and folds from the
# file's values, not from add_initializer overrides); disabling it costs no measurable time here.
NO_FOLDING = ["ConstantFolding"]


def lean_session_options(threads: int | None = None) -> Any:
    """`session_options` for graphs with large frozen weights in an external file.

    Without weight prepacking (and with `NO_FOLDING`) ONNX Runtime keeps no private copy of a frozen
    weight: it maps them from the weights file, clean file pages that sessions of the same process
    and the page cache share. The arena and memory patterns cost no time and keep resident memory down.
    ViT-B-32 step trainer: peak RSS 1.8 -> 1.3 GB, 0.8 GB of it file pages (benchmarks/results/step.md).
    """
    opts = session_options(threads)
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    opts.add_session_config_entry("session.disable_prepacking", "1")
    return opts
