"""The bundle itself: manifest contents, graph names, determinism, tamper detection, weights."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import open_clip
import pytest
import torch
from fixtures_bundle import FASHION_MNIST_LABELS, OrtBundle, ort_infer

from fedclip.exporters.bundle import export_bundle, torch_twin
from fedclip.exporters.config import ExportConfig
from fedclip.exporters.models import build_base_model
from fedclip.sdk.errors import BundleError, ExportError
from fedclip.sdk.hashing import sha256_file
from fedclip.sdk.manifest import Manifest


def _graph_io(path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    ins = tuple(i.name for i in model.graph.input if i.name not in inits)
    return ins, tuple(o.name for o in model.graph.output)


def test_tiny_bundle_manifest(tiny_bundle):
    m = Manifest.load(tiny_bundle)
    assert m.task.kind == "classify" and m.task.labels == FASHION_MNIST_LABELS
    assert m.base_model.name == "fedclip-tiny" and m.base_model.weights_sha256 is None
    assert m.preprocess.image_size == 32 and m.preprocess.interpolation == "bicubic"
    assert m.train_input == "image"
    assert set(m.graphs) == {"training", "eval", "optimizer", "inference", "text_encoder"}
    assert m.tokenizer is not None  # the text encoder graph (open vocabulary) needs it
    assert {"torch", "onnx", "open_clip_torch"} <= set(m.tools)
    names = [t.name for t in m.tensors]
    assert "visual.transformer.resblocks.0.attn.q_proj.lora_A" in names
    assert "transformer.resblocks.1.attn.v_proj.lora_B" in names
    assert len(names) == 2 * 2 * 2 * 2  # towers x blocks x (q, v) x (A, B)
    assert all(t.trainable and t.exchanged for t in m.tensors)
    shapes = {t.name: t.shape for t in m.tensors}
    assert shapes["visual.transformer.resblocks.0.attn.q_proj.lora_A"] == (4, 64)
    assert shapes["visual.transformer.resblocks.0.attn.q_proj.lora_B"] == (64, 4)


@pytest.mark.parametrize(
    "args",
    [
        dict(),
        dict(towers=("text",)),
        dict(task="contrastive"),
        dict(adapter="tri-lora", init="frozen-seed", towers=("vision",)),
    ],
    ids=["classify", "classify-text-only", "contrastive", "tri-lora-frozen"],
)
def test_graph_names_follow_the_contract(bundle_factory, args):
    bundle = bundle_factory(**args)
    m = Manifest.load(bundle)
    for key in ("inference",) + (("image_encoder",) if "image_encoder" in m.graphs else ()):
        spec = m.graphs[key]
        assert _graph_io(bundle / spec.file) == (spec.inputs, spec.outputs), key
    # training/eval graphs: what the ORT training API exposes (parameters come from the checkpoint)
    ob = OrtBundle(bundle)
    ob.module.train()
    assert (tuple(ob.module.input_names()), tuple(ob.module.output_names())) == (
        m.graphs["training"].inputs,
        m.graphs["training"].outputs,
    )
    ob.module.eval()
    assert (tuple(ob.module.input_names()), tuple(ob.module.output_names())) == (
        m.graphs["eval"].inputs,
        m.graphs["eval"].outputs,
    )
    x = m.train_input
    if m.task.kind == "classify":
        assert m.graphs["training"].inputs == (x, "labels", "label_bias") and m.graphs["eval"].outputs == (
            "loss",
            "logits",
        )
        assert m.graphs["inference"].outputs == ("logits", "image_embeds")
    else:
        assert m.graphs["training"].inputs == (x, "text")
        assert m.graphs["inference"].inputs == ("image", "text")
        assert m.graphs["inference"].outputs == ("image_embeds", "text_embeds")
    assert m.graphs["training"].outputs == ("loss",)
    # dynamic batch axis everywhere: batch sizes 1 and 5 both run
    size = m.preprocess.image_size
    for n in (1, 5):
        feeds = {"image": np.zeros((n, 3, size, size), np.float32)}
        if m.task.kind == "contrastive":
            feeds["text"] = np.zeros((n, m.tokenizer.context_length), np.int64)
        outs = ort_infer(bundle / m.graphs["inference"].file, feeds)
        assert all(o.shape[0] == n for o in outs)


def test_text_only_bundle_trains_from_cached_embeddings(bundle_factory):
    m = Manifest.load(bundle_factory(towers=("text",)))
    assert m.train_input == "image_embeds"
    assert m.graphs["image_encoder"].inputs == ("image",)
    assert m.graphs["training"].inputs == ("image_embeds", "labels", "label_bias")
    assert all(t.name.startswith("transformer.") for t in m.tensors)


def test_vision_only_classify_has_constant_class_embeddings(bundle_factory):
    bundle = bundle_factory(towers=("vision",))
    model = onnx.load(str(bundle / Manifest.load(bundle).graphs["inference"].file))
    inits = {i.name for i in model.graph.initializer}
    assert "class_text_embeds" in inits
    assert not any(n.startswith("transformer.") for n in inits)  # the text tower is not in the graph


def test_tri_lora_manifest_marks_only_c_exchanged(bundle_factory):
    ce = Manifest.load(bundle_factory(adapter="tri-lora"))
    assert {t.name.rsplit(".", 1)[1] for t in ce.exchanged} == {"lora_C"}
    assert all(t.trainable for t in ce.tensors)
    assert all(t.shape == (4, 4) for t in ce.exchanged)
    frozen = Manifest.load(bundle_factory(adapter="tri-lora", init="frozen-seed"))
    assert {t.name.rsplit(".", 1)[1] for t in frozen.trainable} == {"lora_C"}
    assert frozen.adapter.init == "frozen-seed"
    # only C is trainable in the ORT artifacts too
    ob = OrtBundle(bundle_factory(adapter="tri-lora", init="frozen-seed"))
    trainable_count = sum(int(np.prod(t.shape)) for t in frozen.trainable)
    assert ob.module.get_parameters_size(trainable_only=True) == trainable_count


def test_contrastive_bundle_ships_the_tokenizer(bundle_factory):
    bundle = bundle_factory(task="contrastive")
    m = Manifest.load(bundle)
    assert m.tokenizer is not None and m.tokenizer.context_length == 32
    assert m.tokenizer.file == "tokenizer/bpe_simple_vocab_16e6.txt.gz"
    from open_clip.tokenizer import default_bpe

    assert sha256_file(bundle / m.tokenizer.file) == sha256_file(default_bpe())
    assert m.files[m.tokenizer.file] == sha256_file(default_bpe())


def test_exports_are_deterministic(bundle_factory, tmp_path):
    first = bundle_factory()
    export_bundle(ExportConfig(model="fedclip-tiny", out=str(tmp_path / "again"), labels=("a", "b", "c")))
    a, b = Manifest.load(first), Manifest.load(tmp_path / "again")
    assert a.bundle_id == b.bundle_id and a.files == b.files
    for rel in a.files:
        assert (first / rel).read_bytes() == (tmp_path / "again" / rel).read_bytes(), rel


def test_tampered_bundle_is_refused(tiny_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    Manifest.load(copy, verify=True)
    data = bytearray((copy / "inference_model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "inference_model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="inference_model.onnx"):
        Manifest.load(copy, verify=True)
    shutil.copyfile(tiny_bundle / "inference_model.onnx", copy / "inference_model.onnx")
    text = (copy / "manifest.yaml").read_text().replace("rank: 4", "rank: 8")
    (copy / "manifest.yaml").write_text(text)
    with pytest.raises(BundleError, match="modified"):
        Manifest.load(copy, verify=True)


@pytest.mark.slow
def test_local_weights_file_and_json_config(tmp_path):
    # a JSON config file (a copy of fedclip-tiny's) and a weights file for it
    cfg = open_clip.get_model_config("fedclip-tiny") if "fedclip-tiny" in open_clip.list_models() else None
    if cfg is None:
        build_base_model("fedclip-tiny")
        cfg = open_clip.get_model_config("fedclip-tiny")
    cfg_path = tmp_path / "my-clip.json"
    import json

    cfg_path.write_text(json.dumps(cfg))
    donor = build_base_model(str(cfg_path), seed=123).model
    weights = tmp_path / "weights.pt"
    torch.save(donor.state_dict(), weights)
    out = tmp_path / "bundle"
    m = export_bundle(
        ExportConfig(model=str(cfg_path), pretrained=str(weights), out=str(out), labels=("x", "y"))
    )
    assert m.base_model.name == "my-clip"
    assert m.base_model.weights_sha256 == sha256_file(weights)
    # the bundle carries the loaded weights, not the seed's random ones
    twin = torch_twin(m, model=str(cfg_path), pretrained=str(weights))
    image = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    logits, embeds = ort_infer(out / m.graphs["inference"].file, {"image": image})
    with torch.no_grad():
        np.testing.assert_allclose(embeds, donor.encode_image(torch.from_numpy(image)).numpy(), atol=1e-4)
        ref_logits = twin.inference(torch.from_numpy(image))[0].numpy()
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)


def test_a_json_model_config_leaves_no_temporary_files_and_stays_registered(tmp_path, monkeypatch):
    import json
    import tempfile

    from fedclip.exporters.models import CONFIG_DIR

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where mkdtemp and friends write
    cfg = json.loads((CONFIG_DIR / "fedclip-tiny.json").read_text())
    paths = []
    for width in (48, 40):  # content-derived names: configs no other test registered
        paths.append(tmp_path / f"clip-{width}.json")
        paths[-1].write_text(json.dumps(dict(cfg, embed_dim=width)))
    first = build_base_model(str(paths[0]), seed=1)
    assert list(scratch.iterdir()) == []
    build_base_model(str(paths[1]), seed=1)  # open_clip rescans every config path it was given
    assert list(scratch.iterdir()) == []
    again = build_base_model(str(paths[0]), seed=1)
    assert first.embed_dim == again.embed_dim == 48 and again.config == first.config


def test_weights_that_do_not_fit_raise_export_error(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save({"visual.proj": torch.zeros(2, 2)}, weights)
    with pytest.raises(ExportError, match="do not fit"):
        export_bundle(
            ExportConfig(
                model="fedclip-tiny", pretrained=str(weights), out=str(tmp_path / "b"), labels=("a",)
            )
        )
    assert not (tmp_path / "b").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]
