"""`fedclip-coord adapters export VERSION --format open_clip | lora`: the merged checkpoint loads into
plain open_clip and gives the ONNX inference graph's logits; the LoRA file applied to the plain base
model by its documented mapping gives the same weights."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fedclip.coordinator.registry import Registry
from fedclip.coordinator.store import Store
from fedclip.device_agent.predictor import Predictor
from fedclip.sdk.adapters import decode_tensors
from fedclip.sdk.manifest import Manifest


def _coord(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fedclip.coordinator.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "args",
    [dict(), dict(adapter="tri-lora", init="frozen-seed", targets=("q", "k", "v", "o", "mlp"))],
    ids=["lora-qv", "tri-lora-all-targets"],
)
def test_merged_open_clip_checkpoint_and_lora_file(bundle_factory, tmp_path, args):
    import open_clip

    from fedclip.exporters.adapter_export import apply_lora
    from fedclip.exporters.models import build_base_model

    bundle = bundle_factory(**args)
    m = Manifest.load(bundle)
    rng = np.random.default_rng(1)
    tensors = {t.name: rng.normal(0, 0.2, t.shape).astype(np.float32) for t in m.exchanged}
    state = tmp_path / "coord"
    with Store(state) as s:
        s.set_meta("bundle_id", m.bundle_id)
        Registry(s, m.bundle_id, m.adapter.kind).ensure_initial(tensors, "fedavg")

    ckpt = tmp_path / "out" / "merged.pt"
    r = _coord(
        "adapters",
        "export",
        "g-r0",
        "--format",
        "open_clip",
        "--bundle",
        str(bundle),
        "--out",
        str(ckpt),
        "--state",
        str(state),
    )
    assert r.returncode == 0, r.stderr
    cfg = ckpt.with_name("fedclip-tiny.json")
    assert r.stdout.split() == [str(ckpt), str(cfg)]

    # plain open_clip, nothing of fedclip: register the config, create the model from the file
    open_clip.add_model_config(cfg)
    model = open_clip.create_model("fedclip-tiny", pretrained=str(ckpt)).eval()
    pixels = rng.normal(0, 1, (5, 3, m.preprocess.image_size, m.preprocess.image_size)).astype(np.float32)
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(pixels), normalize=True)
        text = model.encode_text(
            open_clip.tokenize(m.task.prompts(), context_length=m.tokenizer.context_length), normalize=True
        )
        torch_logits = (model.logit_scale.exp() * img @ text.T).numpy()
    onnx_logits = Predictor(bundle, adapter=tensors).predict(pixels)
    base_logits = Predictor(bundle).predict(pixels)
    assert not np.allclose(onnx_logits, base_logits, atol=1e-3)  # the adapter matters
    np.testing.assert_allclose(torch_logits, onnx_logits, atol=1e-4)

    lora = tmp_path / "out" / "adapter-lora.safetensors"
    r = _coord(
        "adapters",
        "export",
        "g-r0",
        "--format",
        "lora",
        "--bundle",
        str(bundle),
        "--out",
        str(lora),
        "--state",
        str(state),
    )
    assert r.returncode == 0, r.stderr
    factors, meta = decode_tensors(lora.read_bytes(), str(lora))
    assert meta["kind"] == m.adapter.kind and "fedclip_open_clip_mapping" in meta
    base = build_base_model("fedclip-tiny", None, seed=m.adapter.seed).model  # the bundle's base weights
    sd = base.state_dict()
    apply_lora(sd, factors, meta)
    merged = torch.load(ckpt, weights_only=True)
    assert set(merged) == set(sd)
    for k in merged:
        torch.testing.assert_close(sd[k], merged[k], atol=1e-6, rtol=0)


def test_export_refuses_what_it_cannot_do(tiny_bundle, bundle_factory, tmp_path):
    m = Manifest.load(tiny_bundle)
    state = tmp_path / "coord"
    with Store(state) as s:
        s.set_meta("bundle_id", m.bundle_id)
        Registry(s, m.bundle_id, "lora").ensure_initial(
            {t.name: np.zeros(t.shape, np.float32) for t in m.exchanged}, "fedavg"
        )
    out = str(tmp_path / "x.pt")
    for args, text in [
        (("--format", "onnx"), "unknown format"),
        (("--format", "open_clip"), "needs --bundle"),
        (("--format", "lora", "--bundle", str(bundle_factory(labels=("x", "y")))), "not " + m.bundle_id[:12]),
    ]:
        r = _coord("adapters", "export", "g-r0", "--out", out, "--state", str(state), *args)
        assert r.returncode == 2 and text in r.stderr and r.stderr.count("\n") == 1, r.stderr
