"""Bundle fixtures: tiny random-init bundles exported once per session and shared."""

from __future__ import annotations

from pathlib import Path

import pytest

FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

__all__ = ["FASHION_MNIST_LABELS", "bundle_factory", "export_cache", "tiny_bundle"]


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory):
    """The session's export cache: the first step export of a shape traces, later ones fill weights in.

    Also the default of every `fedclip-coord export` the tests start (demo runs included), so no test
    writes to the user's ~/.cache and a shape is traced once per test run."""
    import os

    from fedclip.exporters.export_cache import ENV, ExportCache

    root = tmp_path_factory.mktemp("export-cache")
    saved = os.environ.get(ENV)
    os.environ[ENV] = str(root)
    yield ExportCache(root)
    if saved is None:
        os.environ.pop(ENV, None)
    else:
        os.environ[ENV] = saved


@pytest.fixture(scope="session")
def bundle_factory(tmp_path_factory, export_cache):
    """`make(adapter=..., task=..., towers=..., formats=..., ...) -> Path`: a fedclip-tiny bundle, cached
    per arguments; `formats` is ("ort-training",) (default), ("step",) or both. Step graphs go through
    the session's export cache."""
    root = tmp_path_factory.mktemp("bundles")
    cache: dict[tuple, Path] = {}

    def make(
        adapter: str = "lora",
        task: str = "classify",
        towers: tuple[str, ...] = ("vision", "text"),
        targets: tuple[str, ...] = ("q", "v"),
        rank: int = 4,
        alpha: float = 8.0,
        labels: tuple[str, ...] = ("a", "b", "c"),
        init: str = "ce-lora",
        formats: tuple[str, ...] = ("ort-training",),
    ) -> Path:
        # ORT artifacts only by default: the step export costs time most tests do not need.
        fmt = {("ort-training",): "ort-training", ("step",): "step"}.get(tuple(formats), "both")
        key = (adapter, task, tuple(towers), tuple(targets), rank, alpha, tuple(labels), init, fmt)
        if key not in cache:
            from fedclip.exporters.bundle import export_bundle
            from fedclip.exporters.config import ExportConfig

            out = root / f"bundle{len(cache)}"
            export_bundle(
                ExportConfig(
                    model="fedclip-tiny",
                    out=str(out),
                    adapter=adapter,
                    rank=rank,
                    alpha=alpha,
                    targets=tuple(targets),
                    towers=tuple(towers),
                    init=init,
                    task=task,
                    labels=tuple(labels) if task == "classify" else (),
                    format=fmt,
                ),
                cache=export_cache,
            )
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_bundle(bundle_factory) -> Path:
    """Classify, lora on q,v of both towers, the 10 Fashion-MNIST classes."""
    return bundle_factory(labels=FASHION_MNIST_LABELS)


# ---- ORT helpers shared by the export tests (real onnxruntime.training, no mocks) --------------
class OrtBundle:
    """The training API objects of one bundle: checkpoint state, module, AdamW optimizer."""

    def __init__(self, bundle: Path) -> None:
        from onnxruntime.training import api

        from fedclip.sdk.manifest import Manifest

        self.dir = Path(bundle)
        self.manifest = Manifest.load(bundle)
        g = self.manifest.graphs
        self.state = api.CheckpointState.load_checkpoint(str(self.dir / self.manifest.checkpoint))
        self.module = api.Module(
            str(self.dir / g["training"].file), self.state, str(self.dir / g["eval"].file), device="cpu"
        )
        self.optimizer = api.Optimizer(str(self.dir / g["optimizer"].file), self.module)

    def param(self, name: str):
        return self.state.parameters[name].data.copy()

    def adapter(self) -> dict:
        return {t.name: self.param(t.name) for t in self.manifest.tensors}

    def inputs(self, x, y, bias=None) -> list:
        """The training graph's inputs: `bias` [batch, labels] (default zeros) where it takes label_bias."""
        import numpy as np

        if not self.manifest.takes_label_bias:
            return [x, y]
        n = len(self.manifest.task.labels)
        return [x, y, np.zeros((len(y), n), np.float32) if bias is None else bias]

    def train(self, x, y, steps: int, lr: float, bias=None) -> list[float]:
        self.optimizer.set_learning_rate(lr)
        self.module.train()
        losses = []
        for _ in range(steps):
            out = self.module(*self.inputs(x, y, bias))
            loss = out[0] if isinstance(out, (list, tuple)) else out
            losses.append(float(loss))
            self.optimizer.step()
            self.module.lazy_reset_grad()
        return losses

    def evaluate(self, x, y, bias=None) -> list:
        self.module.eval()
        out = self.module(*self.inputs(x, y, bias))
        return list(out) if isinstance(out, (list, tuple)) else [out]


def ort_infer(path: Path, feeds: dict, overrides: dict | None = None) -> list:
    """Run an inference graph; `overrides` replace initializers at load time (adapter hot-swap)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # overridable initializers warn once per tensor
    keep = []
    for name, arr in (overrides or {}).items():
        value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        keep.append(value)  # the session borrows the buffer
        opts.add_initializer(name, value)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)
