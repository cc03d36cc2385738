"""The bundle manifest: seal, load, verify; tampering with a file or the manifest is refused."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from fedclip.sdk.errors import BundleError, ConfigError
from fedclip.sdk.manifest import (
    MANIFEST_NAME,
    AdapterSpec,
    BaseModel,
    GraphSpec,
    Manifest,
    Preprocess,
    TaskSpec,
    TensorSpec,
    TokenizerSpec,
)


def make_manifest(**changes) -> Manifest:
    m = Manifest(
        format_version=1,
        base_model=BaseModel("fedclip-tiny", 64),
        # alpha as an int and mean as ints on purpose: a sealed manifest must still load.
        adapter=AdapterSpec("tri-lora", 4, 8, ("q", "v"), ("vision", "text"), init="frozen-seed", seed=3),
        task=TaskSpec("classify", ("cat", "dog")),
        preprocess=Preprocess(32, (0, 0, 0), (1, 1, 1)),
        tensors=(
            TensorSpec("visual.q_proj.lora_A", (4, 64), exchanged=False),
            TensorSpec("visual.q_proj.lora_C", (4, 4)),
        ),
        graphs={"training": GraphSpec("training_model.onnx", ("image", "labels"), ("loss",))},
        tokenizer=TokenizerSpec("tokenizer/bpe.txt.gz", 77),
        tools={"onnx": "1.17.0"},
    )
    return dataclasses.replace(m, **changes)


@pytest.fixture
def bundle(tmp_path):
    (tmp_path / "training_model.onnx").write_bytes(b"graph bytes")
    (tmp_path / "checkpoint").write_bytes(b"\x00\x01")
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "bpe.txt.gz").write_bytes(b"vocab")
    sealed = make_manifest().seal(tmp_path)
    return tmp_path, sealed


def test_seal_then_load_round_trip(bundle):
    path, sealed = bundle
    loaded = Manifest.load(path)
    assert loaded == sealed or loaded.bundle_id == sealed.bundle_id
    assert len(loaded.bundle_id) == 64
    assert set(loaded.files) == {"training_model.onnx", "checkpoint", "tokenizer/bpe.txt.gz"}
    assert loaded.adapter.alpha == 8.0 and loaded.adapter.scale == 2.0
    assert loaded.exchanged == (loaded.tensor("visual.q_proj.lora_C"),)
    assert [t.name for t in loaded.trainable] == ["visual.q_proj.lora_A", "visual.q_proj.lora_C"]
    assert loaded.task.prompts() == ["a photo of a cat.", "a photo of a dog."]
    with pytest.raises(KeyError):
        loaded.tensor("nope")


def test_equal_inputs_give_equal_ids(bundle, tmp_path_factory):
    path, sealed = bundle
    other = tmp_path_factory.mktemp("other")
    for rel in sealed.files:
        (other / rel).parent.mkdir(parents=True, exist_ok=True)
        (other / rel).write_bytes((path / rel).read_bytes())
    assert make_manifest().seal(other).bundle_id == sealed.bundle_id
    (other / "checkpoint").write_bytes(b"\x00\x02")
    assert make_manifest().seal(other).bundle_id != sealed.bundle_id


def test_tampered_file_is_refused(bundle):
    path, _ = bundle
    (path / "checkpoint").write_bytes(b"\x00\x02")
    with pytest.raises(BundleError, match="file checkpoint is corrupt"):
        Manifest.load(path)
    assert Manifest.load(path, verify=False).files["checkpoint"]


def test_missing_file_is_refused(bundle):
    path, _ = bundle
    (path / "tokenizer" / "bpe.txt.gz").unlink()
    with pytest.raises(BundleError, match="tokenizer/bpe.txt.gz listed in the manifest is missing"):
        Manifest.load(path)


def test_modified_manifest_is_refused(bundle):
    path, _ = bundle
    data = yaml.safe_load((path / MANIFEST_NAME).read_text())
    data["task"]["labels"] = ["cat", "wolf"]
    (path / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(BundleError, match="manifest was modified"):
        Manifest.load(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(format_version=3), "format_version 3 is not supported"),
        (lambda d: d.update(format_version=True), "format_version True is not supported"),
        (lambda d: d.pop("adapter"), "adapter: required field is missing"),
        (lambda d: d["adapter"].update(rank="four"), "adapter.rank: expected an integer"),
        (lambda d: d["adapter"].update(rank=0), "adapter.rank: must be > 0"),
        (lambda d: d["adapter"].update(targets=["q", "z"]), "unknown target 'z'"),
        (lambda d: d.update(surprise=1), "unknown field 'surprise'"),
        (lambda d: d["task"].update(labels=["a", "a"]), "labels must be unique"),
    ],
)
def test_invalid_manifest_is_a_bundle_error(bundle, mutate, message):
    path, _ = bundle
    data = yaml.safe_load((path / MANIFEST_NAME).read_text())
    mutate(data)
    (path / MANIFEST_NAME).write_text(yaml.safe_dump(data))
    with pytest.raises(BundleError, match=message):
        Manifest.load(path)


def test_format_1_bundles_still_load_and_say_they_take_no_label_bias(bundle, tmp_path):
    """Format 2 added `label_bias` to classify training graphs; bundles of format 1 keep working
    (plain CE), and what a trainer may feed is read from the graphs, not assumed."""
    path, sealed = bundle
    assert sealed.format_version == 1 and Manifest.load(path).takes_label_bias is False
    two = make_manifest(
        format_version=2,
        graphs={
            "training": GraphSpec("training_model.onnx", ("image", "labels", "label_bias"), ("loss",)),
            "step": GraphSpec("step_model.onnx", ("image", "labels", "label_bias", "step"), ("loss",)),
        },
    )
    assert two.takes_label_bias
    half = make_manifest(
        graphs={
            "training": GraphSpec("training_model.onnx", ("image", "labels", "label_bias"), ("loss",)),
            "step": GraphSpec("step_model.onnx", ("image", "labels", "step"), ("loss",)),
        },
    )
    assert not half.takes_label_bias  # a trainer of either format must be able to feed it


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="not a fedclip bundle"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("a: [1\n")
    with pytest.raises(BundleError, match="not valid YAML"):
        Manifest.load(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("- 1\n")
    with pytest.raises(BundleError, match="not a mapping"):
        Manifest.load(tmp_path)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: AdapterSpec("lora", 4, 0.0, ("q",), ("vision",)), "alpha"),
        (lambda: AdapterSpec("lora", 4, 8.0, (), ("vision",)), "at least one target"),
        (lambda: AdapterSpec("lora", 4, 8.0, ("q",), ("audio",)), "unknown tower"),
        (lambda: TaskSpec("classify"), "at least one label"),
        (lambda: TaskSpec("classify", ("a", " ")), "empty label"),
        (lambda: TaskSpec("classify", ("a",), prompt="a photo"), "must contain"),
    ],
)
def test_spec_validation(build, message):
    with pytest.raises(ConfigError, match=message):
        build()
    assert TaskSpec("contrastive").labels == ()
