"""Export formats and the agent's backend choice, end to end: `--format step` bundles, `--backend`,
the one-onnxruntime-build guard, and the real `fedclip-agent` CLIs of every device venv (plain
onnxruntime, no torch) training, evaluating, predicting and serving a round over mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedclip.sdk.errors import BackendError, ConfigError

REPO = Path(__file__).resolve().parents[1]
LABELS = ("a", "b", "c")
COLORS = ((220, 30, 30), (30, 220, 30), (30, 30, 220))


def _device_venvs() -> list[Path]:
    venvs = sorted(p.parents[1] for p in REPO.glob(".venv-device*/bin/fedclip-agent"))
    if not venvs:
        pytest.skip("no device venv: run bash scripts/device_venv.sh (scripts/test.sh makes them)")
    return venvs


# ---- the one-build guard -------------------------------------------------------------------------
def _import_ort(extra_path: Path | None) -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        """
        from fedclip.device_agent.ort_loader import onnxruntime
        from fedclip.sdk.errors import BackendError
        try:
            onnxruntime()
        except BackendError as e:
            print("REFUSED", e)
        else:
            print("OK")
        """
    )
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_two_onnxruntime_builds_in_one_venv_are_refused(tmp_path: Path):
    assert _import_ort(None).stdout.strip() == "OK"  # this venv has one build
    # A second build's metadata where importlib.metadata looks, as `pip install onnxruntime-gpu` leaves it.
    info = tmp_path / "site" / "onnxruntime_gpu-1.99.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: onnxruntime-gpu\nVersion: 1.99.0\n")
    out = _import_ort(tmp_path / "site").stdout.strip()
    assert out.startswith("REFUSED"), out
    assert "onnxruntime-gpu==1.99.0" in out and "onnxruntime-training-cpu==" in out
    assert "separate venvs" in out and "fedclip[agent]" in out and "fedclip[coordinator]" in out


def test_agent_config_backend_is_checked(tmp_path: Path):
    from fedclip.device_agent.config import AgentConfig

    base = {"broker": "mqtt://localhost:1883", "fleet": "f", "id": "d", "bundle": tmp_path}
    base |= {"data": tmp_path, "state": tmp_path}
    assert AgentConfig.load(None, base).backend == "auto"
    assert AgentConfig.load(None, base | {"backend": "step"}).backend == "step"
    with pytest.raises(ConfigError, match="backend"):
        AgentConfig.load(None, base | {"backend": "tensorflow"})


def test_export_format_flag_is_checked(tmp_path: Path):
    out = subprocess.run(
        [sys.executable, "-m", "fedclip.coordinator.cli", "export", "--model", "fedclip-tiny"]
        + ["--labels", "a,b", "--format", "tflite", "--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert "format" in out.stderr and "tflite" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "b").exists()


# ---- step-only bundles ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def step_only(bundle_factory) -> Path:
    return bundle_factory(labels=LABELS, formats=("step",))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """4 noisy solid-colour PNGs per label: easy to learn, real files through the real data loader."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, color in zip(LABELS, COLORS, strict=True):
        (root / label).mkdir()
        for i in range(4):
            px = np.clip(np.array(color) + rng.normal(0, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / label / f"{i}.png")
    return root


@pytest.mark.slow
def test_step_only_export(step_only: Path, bundle_factory):
    import onnx

    from fedclip.coordinator.registry import load_initial_adapter
    from fedclip.device_agent.step_backend import StepTrainer, make_trainer
    from fedclip.sdk.manifest import Manifest

    m = Manifest.load(step_only)
    assert m.formats == ("step",) and m.checkpoint is None
    assert {"step", "step_eval", "inference"} <= set(m.graphs) and "training" not in m.graphs
    assert not list(step_only.glob("training_model.onnx")) and not (step_only / "checkpoint").exists()
    assert {"weights.bin", m.initial_tensors} <= set(m.files)
    # One weights file for the inference and the step graphs: the inference graph keeps no frozen
    # weight inside itself.
    inference = onnx.load(str(step_only / m.graphs["inference"].file), load_external_data=False)
    locations = {e.value for i in inference.graph.initializer for e in i.external_data if e.key == "location"}
    assert locations == {"weights.bin"}

    trainer = make_trainer(step_only)  # auto: the only format there is
    assert isinstance(trainer, StepTrainer)
    initial = load_initial_adapter(step_only, m)
    assert initial.keys() == trainer.get_tensors("exchanged").keys()
    assert all(np.array_equal(v, trainer.get_tensors("exchanged")[k]) for k, v in initial.items())

    with pytest.raises(BackendError, match="ort-training cannot train this bundle"):
        make_trainer(step_only, backend="ort-training")
    ort_only = bundle_factory(labels=LABELS)
    assert Manifest.load(ort_only).formats == ("ort-training",)
    with pytest.raises(BackendError, match="step cannot train this bundle"):
        make_trainer(ort_only, backend="step")


@pytest.mark.slow
def test_cli_exports_both_formats_by_default(tmp_path: Path):
    from fedclip.device_agent.step_backend import StepTrainer, make_trainer
    from fedclip.device_agent.trainer import OrtTrainer
    from fedclip.sdk.manifest import Manifest

    out = tmp_path / "bundle"
    res = subprocess.run(
        [sys.executable, "-m", "fedclip.coordinator.cli", "export", "--model", "fedclip-tiny"]
        + ["--labels", "a,b", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    m = Manifest.load(out)
    assert m.formats == ("ort-training", "step") and "formats: ort-training, step" in res.stdout
    assert isinstance(make_trainer(out), OrtTrainer)  # auto: this venv has the training API
    step = make_trainer(out, backend="step")
    assert isinstance(step, StepTrainer)
    # Both start from the same tensors: the step graph's initial tensors are the checkpoint's.
    ort = make_trainer(out, backend="ort-training").get_tensors()
    assert all(np.array_equal(v, ort[k]) for k, v in step.get_tensors().items())


# ---- the device venvs' real CLIs -----------------------------------------------------------------
def _agent(venv: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(venv / "bin" / "fedclip-agent"), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_device_venv_cli_trains_evaluates_and_predicts(step_only: Path, image_folder: Path, tmp_path: Path):
    for venv in _device_venvs():
        torch_check = subprocess.run(
            [str(venv / "bin" / "python"), "-c", "import importlib.util as u; print(u.find_spec('torch'))"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert torch_check.stdout.strip() == "None", f"{venv}: torch is installed"
        common = ["--bundle", str(step_only), "--data", str(image_folder), "--threads", "1", "--json"]
        adapter = tmp_path / f"{venv.name}.safetensors"
        train = _agent(
            venv, "train", *common, "--backend", "step", "--holdout", "0.3", "--epochs", "2",
            "--batch-size", "4", "--lr", "0.01", "--out", str(adapter),
        )  # fmt: skip
        assert train.returncode == 0, f"{venv}: {train.stderr[-2000:]}"
        metrics = json.loads(train.stdout)
        assert 0.0 <= metrics["accuracy_after"] <= 1.0 and np.isfinite(metrics["train_loss_last"])
        assert metrics["train_steps"] > 0
        assert adapter.is_file()

        ev = _agent(venv, "eval", *common, "--adapter", str(adapter))
        assert ev.returncode == 0, f"{venv}: {ev.stderr[-2000:]}"
        ev_metrics = json.loads(ev.stdout)
        assert ev_metrics["num_samples"] == 12 and 0.0 <= ev_metrics["accuracy"] <= 1.0

        image = next((image_folder / "a").glob("*.png"))
        pred = _agent(venv, "predict", str(image), "--bundle", str(step_only), "--adapter", str(adapter))
        assert pred.returncode == 0, f"{venv}: {pred.stderr[-2000:]}"
        assert all(label in pred.stdout for label in LABELS), pred.stdout

        wrong = _agent(venv, "train", *common, "--backend", "ort-training")
        assert wrong.returncode == 2, wrong.stderr
        assert "ort-training" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.timeout(600)
def test_device_venv_agent_serves_a_round(mosquitto, step_only: Path, image_folder: Path, tmp_path: Path):
    from fixtures_fleet import FLEET, Coordinator

    from fedclip.sdk.adapters import check_adapter
    from fedclip.sdk.manifest import Manifest
    from fedclip.sdk.wire import MsgType, decode

    venv = _device_venvs()[0]
    coord = Coordinator(mosquitto.url, Manifest.load(step_only))
    log = tmp_path / "agent.log"
    args = ["start", "--broker", mosquitto.url, "--fleet", FLEET, "--id", "dev-step"]
    args += ["--bundle", str(step_only), "--data", str(image_folder), "--state", str(tmp_path / "state")]
    args += ["--threads", "1", "--backend", "step"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "fedclip-agent"), *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONUNBUFFERED": "1"},
        )
    try:

        def alive_and(cond):
            def check():
                if proc.poll() is not None:
                    pytest.fail(f"agent exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
                return cond()

            return check

        coord.wait(alive_and(lambda: coord.last_status("dev-step")), "online status")
        coord.send_task("dev-step", 1)
        blob = coord.wait(
            alive_and(lambda: (coord.update_blobs("dev-step", 1) or [None])[0]), "update of round 1"
        )
        msg = decode(blob, fleet=FLEET, expect=MsgType.UPDATE)
        tensors = check_adapter(msg.adapter_tensors, coord.manifest, "update")
        start = coord.starting_adapter(1)
        assert any(not np.array_equal(tensors[k], start[k]) for k in start), "training changed nothing"
        assert np.isfinite(msg.envelope.body["metrics"]["accuracy_after"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert "Traceback" not in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        coord.close()
