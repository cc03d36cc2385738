"""Local inference over a bundle's inference graph, with adapter tensors swapped in.

Adapter tensors are initializers of the inference graph named like the torch parameters, so a trained
adapter replaces them through `SessionOptions.add_initializer` without touching the model file. The
bundle's text encoder graph (open vocabulary) takes the text tower's adapter tensors the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedclip.device_agent.ort_loader import (
    NO_FOLDING,
    Session,
    device_providers,
    lean_session_options,
    onnxruntime,
)
from fedclip.device_agent.shared_weights import add_shared_initializers, shared_initializers
from fedclip.sdk.adapters import check_tensors
from fedclip.sdk.errors import BackendError, BundleError, DataError
from fedclip.sdk.manifest import Manifest
from fedclip.sdk.preprocess import ImageTransform, load_image


class Predictor:
    """`predict(images) -> logits`, `embed_images(images) -> image_embeds` for one adapter."""

    def __init__(
        self,
        bundle_dir: str | Path,
        *,
        adapter: Mapping[str, np.ndarray] | None = None,
        device: str = "auto",
        threads: int | None = None,
        verify: bool = True,
        manifest: Manifest | None = None,
    ) -> None:
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest if manifest is not None else Manifest.load(self.bundle_dir, verify=verify)
        if "inference" not in self.manifest.graphs:
            raise BundleError(f"{self.bundle_dir}: manifest has no 'inference' graph")
        # auto: CUDA where the onnxruntime build has it (a CPU fallback for nodes without a CUDA
        # kernel), else the CPU; self.device says which was chosen.
        self.device, self._providers = device_providers(device)
        self.threads = threads
        self.transform = ImageTransform(self.manifest.preprocess)
        # ORT reads the initializer buffers at run time: the arrays must outlive the session.
        self._keep: list[Any] = []
        self._tensors: Mapping[str, np.ndarray] = {}
        if adapter:
            self._tensors = check_tensors(adapter, self.manifest.trainable, "adapter", require_all=False)
        # Sessions open on first use: an embedding cache that only needs the image encoder (or
        # nothing, when every embedding is cached) never loads the full inference graph's weights.
        self._inference: Session | None = None
        self._encoder: Session | None = None
        self._text: Any = None
        self._tokenizer: Any = None

    @property
    def _session(self) -> Session:
        if self._inference is None:
            self._inference = self._open("inference", self._tensors)
        return self._inference

    @property
    def _inputs(self) -> set[str]:
        return {i.name for i in self._session.get_inputs()}

    @property
    def _outputs(self) -> list[str]:
        return [o.name for o in self._session.get_outputs()]

    def _open(self, key: str, tensors: Mapping[str, np.ndarray]) -> Session:
        ort = onnxruntime()
        opts = lean_session_options(self.threads)
        file = self.manifest.graphs[key].file
        overrides = {name: np.ascontiguousarray(arr) for name, arr in tensors.items()}
        frozen = shared_initializers(self.bundle_dir, self.manifest, file, skip=overrides)
        add_shared_initializers(opts, ort, {**frozen, **overrides}, self._keep)
        path = self.bundle_dir / file
        # Off always: besides copying frozen weights, ORT's ConstantFolding folds from the model file's
        # values, not from add_initializer's (onnxruntime 1.19: an override was silently lost behind a
        # folded Transpose).
        try:
            return ort.InferenceSession(
                str(path), sess_options=opts, providers=self._providers, disabled_optimizers=NO_FOLDING
            )
        except Exception as e:  # ORT raises its own exception types (Fail, InvalidGraph, ...)
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise BackendError(f"{path}: ONNX Runtime cannot load the {key} graph ({msg})") from None

    def load(self) -> Predictor:
        """Open every session this predictor serves with now, rather than on first use: a caller
        that swaps predictors (`Classifier`) never serves a request with a half-loaded one."""
        _ = self._session
        if "text_encoder" in self.manifest.graphs:
            _ = self._text_session
        return self

    @property
    def _text_session(self) -> Any:
        if self._text is None:
            if "text_encoder" not in self.manifest.graphs:
                raise BundleError(
                    f"{self.bundle_dir}: the bundle has no text encoder graph (exported before open "
                    "vocabulary); re-export it to classify against other labels"
                )
            # The text graph holds only the text tower: the vision tower's tensors are not its inputs.
            text = {n: a for n, a in self._tensors.items() if not n.startswith("visual.")}
            self._text = self._open("text_encoder", text)
        return self._text

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """int64 [N, context_length] tokens with the bundle's own vocabulary."""
        if self._tokenizer is None:
            from fedclip.sdk.tokenizer import Tokenizer

            spec = self.manifest.tokenizer
            if spec is None:
                raise BundleError(f"{self.bundle_dir}: the bundle has no tokenizer")
            self._tokenizer = Tokenizer.from_file(self.bundle_dir / spec.file, spec.context_length)
        return self._tokenizer(texts)

    def encode_texts(self, texts: list[str]) -> tuple[np.ndarray, float]:
        """(text embeddings [N, D] unnormalized, the logit scale) through the adapted text tower."""
        embeds, scale = self._text_session.run(["text_embeds", "logit_scale"], {"text": self.tokenize(texts)})
        return embeds, float(scale[0])

    def image_outputs(self, images: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """(logits over the bundle's labels or None, image embeddings) in one run of the graphs."""
        images = self._images(images)
        names = self._outputs
        if "text" not in self._inputs and "image_embeds" in names:
            if "logits" in names:
                logits, embeds = self._session.run(["logits", "image_embeds"], {"image": images})
                return logits, embeds
            return None, self._session.run(["image_embeds"], {"image": images})[0]
        return None, self.embed_images(images)

    def pixels(self, images: Iterable[Any]) -> np.ndarray:
        """float32 [B, 3, S, S] from PIL images, HxWx3 uint8 arrays, image paths or preprocessed arrays
        (the `Classifier`'s inputs); a bad one is a one-line DataError naming it."""
        from PIL import Image

        s = self.manifest.preprocess.image_size
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (3, s, s):
            return np.ascontiguousarray(images, dtype=np.float32)
        out = []
        for i, img in enumerate(images):
            if isinstance(img, np.ndarray):
                if img.shape == (3, s, s) and img.dtype != np.uint8:
                    out.append(img.astype(np.float32, copy=False))
                    continue
                if img.ndim not in (2, 3) or img.dtype != np.uint8:
                    raise DataError(
                        f"image {i}: an array must be HxW or HxWx3 uint8, or float32 [3, {s}, {s}] "
                        f"preprocessed; got {img.dtype} {list(img.shape)}"
                    )
                img = Image.fromarray(img)
            elif isinstance(img, (str, Path)):
                img = load_image(img)
            elif not isinstance(img, Image.Image):
                raise DataError(
                    f"image {i}: expected a PIL image, an array or a path, got {type(img).__name__}"
                )
            out.append(self.transform(img))
        if not out:
            raise DataError("no images given")
        return np.stack(out)

    def _images(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        s = self.manifest.preprocess.image_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise DataError(f"images must be float32 [B, 3, {s}, {s}], got {list(images.shape)}")
        return images

    @property
    def providers(self) -> list[str]:
        """The execution providers the inference session runs with. ORT drops one it cannot start
        (CUDA listed by the build, its libraries missing) and runs on the rest: this says what is used."""
        return list(self._session.get_providers())

    @property
    def open_graphs(self) -> tuple[str, ...]:
        """The ONNX sessions opened so far: they open lazily, on first use."""
        opened = (("inference", self._inference), ("image_encoder", self._encoder))
        return tuple(name for name, session in opened if session is not None)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Class logits [B, L] (classify bundles)."""
        if self.manifest.task.kind != "classify" or "logits" not in self._outputs:
            raise DataError("predict needs a classify bundle (this one is contrastive)")
        if "text" in self._inputs:
            raise DataError("predict needs a classify bundle (this inference graph takes text)")
        return self._session.run(["logits"], {"image": self._images(images)})[0]

    def embed_images(self, images: np.ndarray) -> np.ndarray:
        """Image embeddings [B, D]: from the image encoder when the bundle has one."""
        images = self._images(images)
        if "image_encoder" in self.manifest.graphs:
            if self._encoder is None:
                self._encoder = self._open("image_encoder", {})
            return self._encoder.run(["image_embeds"], {"image": images})[0]
        if "image_embeds" not in self._outputs:
            raise BundleError(f"{self.bundle_dir}: inference graph gives no image_embeds")
        feeds = {"image": images}
        if "text" in self._inputs:
            # Contrastive graphs embed both towers in one run; a one-token text per image is the
            # cheapest text input, and its embedding is dropped.
            feeds["text"] = self.tokenize([""] * len(images))
        return self._session.run(["image_embeds"], feeds)[0]

    def predict_files(self, paths: list[str | Path]) -> np.ndarray:
        return self.predict(np.stack([self.transform.load(p) for p in paths]))
