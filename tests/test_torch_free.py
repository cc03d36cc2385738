"""The device agent never imports torch: checked in a fresh interpreter, where nothing else could."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

AGENT_MODULES = (
    "fedclip.device_agent.ort_loader",
    "fedclip.device_agent.trainer",
    "fedclip.device_agent.predictor",
    "fedclip.device_agent.classifier",
    "fedclip.device_agent.predictions",
    "fedclip.device_agent.state_rounds",
    "fedclip.device_agent.inference_http",
    "fedclip.device_agent.embed_cache",
    "fedclip.device_agent.batches",
    "fedclip.device_agent.loops",
    "fedclip.device_agent.statistics",
    "fedclip.device_agent.agent",
    "fedclip.device_agent.local_cmd",
    "fedclip.device_agent.serve_cmd",
    "fedclip.device_agent.open_set",
    "fedclip.device_agent.cli",
    "fedclip.sdk.preprocess",
    "fedclip.sdk.data",
)


def _run(code: str, timeout: int = 120) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_agent_imports_without_torch():
    out = _run(
        f"""
        import importlib, json, sys
        for m in {AGENT_MODULES!r}:
            importlib.import_module(m)
        print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "open_clip")
                                or m.startswith(("fedclip.exporters", "fedclip.coordinator")))))
        """
    )
    assert out == []


def test_training_api_loads_without_torch():
    out = _run(
        """
        import json, sys
        from fedclip.device_agent.ort_loader import training_api, onnxruntime
        api = training_api()
        ort = onnxruntime()
        print(json.dumps({"torch": "torch" in sys.modules, "module": api.Module.__name__,
                          "providers": ort.get_available_providers()}))
        """
    )
    assert out["torch"] is False
    assert out["module"] == "Module"
    assert "CPUExecutionProvider" in out["providers"]


def test_real_training_package_still_importable_after_loader():
    """The loader's stand-ins are gone afterwards: an exporting process can import the real package."""
    out = _run(
        """
        import json
        from fedclip.device_agent.ort_loader import training_api
        training_api()
        from onnxruntime.training import artifacts  # the real package (imports torch, which is fine here)
        print(json.dumps({"artifacts": hasattr(artifacts, "generate_artifacts")}))
        """
    )
    assert out["artifacts"] is True


def test_training_the_tiny_bundle_stays_torch_free_and_small(tiny_bundle):
    """Train a few steps in a fresh process; report its peak RSS (printed with -s)."""
    out = _run(
        f"""
        import json, sys
        import numpy as np
        from fedclip.device_agent.trainer import OrtTrainer
        from fedclip.device_agent.predictor import Predictor

        def peak_rss_mb():
            # VmHWM, not getrusage: ru_maxrss survives exec, so it would report the forking pytest
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024

        t = OrtTrainer({str(tiny_bundle)!r}, threads=1)
        s = t.manifest.preprocess.image_size
        rng = np.random.default_rng(0)
        x = rng.standard_normal((32, 3, s, s)).astype(np.float32)
        y = rng.integers(0, len(t.manifest.task.labels), 32)
        losses = [t.train_step({{"image": x, "labels": y}}) for _ in range(5)]
        Predictor({str(tiny_bundle)!r}, adapter=t.get_tensors()).predict(x)
        print(json.dumps({{"torch": "torch" in sys.modules, "losses": losses,
                           "peak_rss_mb": peak_rss_mb()}}))
        """,
        timeout=300,
    )
    print(f"agent peak RSS training the tiny bundle (batch 32): {out['peak_rss_mb']:.0f} MB")
    assert out["torch"] is False
    assert out["losses"][-1] < out["losses"][0]
    assert out["peak_rss_mb"] < 1024
