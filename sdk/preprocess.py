"""Image preprocessing with numpy and Pillow, matching open_clip's eval transform.

open_clip (torchvision) does, for `resize_mode="shortest"`: resize the shortest side to the image size
(long side truncated to int), center crop, convert to RGB, scale to [0, 1], normalize. The same steps
in the same order here (the resize runs in the image's own mode, as torchvision's does, so palette
and grayscale images come out the same), so a device sees the pixels the exporter's model was
built for without torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from fedclip.sdk.errors import DataError
from fedclip.sdk.manifest import Preprocess

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def load_image(path: str | Path) -> Image.Image:
    """Open and fully decode an image; an unreadable or truncated file is a DataError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return (
                img.copy()
                if img.mode != "P"
                else img.convert("RGBA" if "transparency" in img.info else "RGB")
            )
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: cannot read image ({str(e).splitlines()[0][:120]})") from None


class ImageTransform:
    """`transform(pil_image) -> float32 [3, S, S]`; `transform.batch(images) -> [B, 3, S, S]`."""

    def __init__(self, spec: Preprocess) -> None:
        if len(spec.mean) != 3 or len(spec.std) != 3:
            raise DataError("preprocess: mean and std need 3 values (RGB)")
        self.spec = spec
        self.size = int(spec.image_size)
        self._mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
        self._resample = _RESAMPLE[spec.interpolation]

    def _resize_crop(self, img: Image.Image) -> Image.Image:
        s = self.size
        w, h = img.size
        if self.spec.resize_mode == "squash":
            return img.resize((s, s), self._resample)
        # torchvision's Resize(int): short side -> s, long side -> int(s * long / short)
        if w <= h:
            new_w, new_h = s, int(s * h / w)
        else:
            new_w, new_h = int(s * w / h), s
        img = img.resize((new_w, new_h), self._resample)
        # torchvision's CenterCrop rounds the offset to nearest
        left = int(round((new_w - s) / 2.0))
        top = int(round((new_h - s) / 2.0))
        return img.crop((left, top, left + s, top + s))

    def __call__(self, img: Image.Image) -> np.ndarray:
        img = self._resize_crop(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return ((x - self._mean) / self._std).astype(np.float32, copy=False)

    def batch(self, images: Iterable[Image.Image]) -> np.ndarray:
        arrays = [self(img) for img in images]
        if not arrays:
            return np.zeros((0, 3, self.size, self.size), dtype=np.float32)
        return np.stack(arrays)

    def load(self, path: str | Path) -> np.ndarray:
        return self(load_image(path))
