"""fedclip.sdk.preprocess against open_clip's own eval transform, on real images."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_data import fashion_mnist
from PIL import Image

from fedclip.sdk.errors import DataError
from fedclip.sdk.manifest import Preprocess
from fedclip.sdk.preprocess import ImageTransform, load_image

open_clip = pytest.importorskip("open_clip")

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _fashion_mnist(n: int) -> list[Image.Image]:
    images, _ = fashion_mnist("t10k")
    return [Image.fromarray(img) for img in images[:n]]


def _digits(n: int) -> list[Image.Image]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return [Image.fromarray((img * 255 / 16).astype(np.uint8)) for img in d.images[:n]]


def _photos() -> list[Image.Image]:
    """Smooth colour photos of odd sizes and modes (gradients plus noise, like real scenes)."""
    rng = np.random.default_rng(0)
    out = []
    for w, h in [(37, 53), (300, 201), (64, 64), (129, 17), (223, 225), (500, 333)]:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], axis=-1) * 200
        img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(img))
    out.append(out[1].convert("RGBA"))
    out.append(out[2].convert("L"))
    return out


def _open_clip_pixels(images, spec: Preprocess) -> np.ndarray:
    transform = open_clip.image_transform(
        spec.image_size,
        is_train=False,
        mean=spec.mean,
        std=spec.std,
        resize_mode=spec.resize_mode,
        interpolation=spec.interpolation,
    )
    return np.stack([transform(img).numpy() for img in images])


@pytest.mark.parametrize("size", [32, 224])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
def test_matches_open_clip(size, interpolation, resize_mode):
    spec = Preprocess(size, OPENAI_MEAN, OPENAI_STD, interpolation=interpolation, resize_mode=resize_mode)
    images = _fashion_mnist(20) + _digits(20) + _photos()
    ours = ImageTransform(spec).batch(images)
    theirs = _open_clip_pixels(images, spec)
    assert ours.shape == theirs.shape == (len(images), 3, size, size)
    assert ours.dtype == np.float32
    # measured: bit-identical (0.0); the brief allows 1e-2
    assert np.abs(ours - theirs).max() <= 1e-5


def test_same_predictions_as_open_clip_preprocessing(tiny_bundle):
    from fedclip.device_agent.predictor import Predictor

    predictor = Predictor(tiny_bundle, threads=1)
    spec = predictor.manifest.preprocess
    images = _fashion_mnist(64) + _photos()
    ours = predictor.predict(ImageTransform(spec).batch(images))
    theirs = predictor.predict(_open_clip_pixels(images, spec))
    np.testing.assert_array_equal(ours.argmax(1), theirs.argmax(1))
    assert np.abs(ours - theirs).max() < 1e-2


def test_the_transform_is_not_trivially_equal():
    """Guard: a wrong crop offset or missing normalization is caught by the parity tolerance."""
    spec = Preprocess(32, OPENAI_MEAN, OPENAI_STD)
    images = _photos()[:2]
    theirs = _open_clip_pixels(images, spec)
    unnormalized = np.stack(
        [
            np.asarray(img.resize((32, 32), Image.Resampling.BICUBIC), np.float32).transpose(2, 0, 1) / 255
            for img in images
        ]
    )
    assert np.abs(unnormalized - theirs).max() > 1e-2


def test_load_image_errors_are_data_errors(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(DataError, match="not found"):
        load_image(tmp_path / "missing.png")
    truncated = tmp_path / "trunc.png"
    _photos()[4].save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:500])
    with pytest.raises(DataError):
        load_image(truncated)


def test_palette_images_load_as_rgb(tmp_path):
    img = _photos()[0].convert("P", palette=Image.Palette.ADAPTIVE)
    img.save(tmp_path / "p.png")
    loaded = load_image(tmp_path / "p.png")
    assert loaded.mode == "RGB"
    pixels = ImageTransform(Preprocess(32, OPENAI_MEAN, OPENAI_STD)).load(tmp_path / "p.png")
    assert pixels.shape == (3, 32, 32)
