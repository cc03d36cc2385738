"""ONNX graphs vs the PyTorch adapted model: equal outputs before and after ORT training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fixtures_bundle import OrtBundle, ort_infer

from fedclip.exporters.bundle import load_adapter_into_torch, tokenize, torch_twin

TOL = 1e-4

# (bundle arguments, (learning rate, steps)) per placement; C-only training has little capacity,
# so the frozen-seed case gets a larger rank and more steps to memorize the batch.
CASES = {
    "lora-classify-both": (dict(adapter="lora", task="classify", towers=("vision", "text")), (0.02, 40)),
    "lora-classify-text": (
        dict(adapter="lora", task="classify", towers=("text",), targets=("q", "k", "v", "o", "mlp")),
        (0.01, 40),
    ),
    "lora-classify-vision": (
        dict(adapter="lora", task="classify", towers=("vision",), targets=("q", "v", "mlp")),
        (0.02, 40),
    ),
    "trilora-celora-classify-both": (
        dict(adapter="tri-lora", task="classify", towers=("vision", "text")),
        (0.02, 40),
    ),
    "trilora-frozen-classify-vision": (
        dict(
            adapter="tri-lora",
            init="frozen-seed",
            task="classify",
            towers=("vision",),
            targets=("q", "k", "v", "o"),
            rank=8,
            alpha=16.0,
        ),
        (0.1, 60),
    ),
    "lora-contrastive-both": (
        dict(adapter="lora", task="contrastive", towers=("vision", "text")),
        (0.02, 40),
    ),
    "lora-contrastive-vision": (dict(adapter="lora", task="contrastive", towers=("vision",)), (0.02, 40)),
    "trilora-celora-contrastive-text": (
        dict(adapter="tri-lora", task="contrastive", towers=("text",), targets=("q", "k", "v", "o", "mlp")),
        (0.01, 40),
    ),
}

CAPTIONS = [f"a photo of a {w}." for w in ("cat", "dog", "car", "tree", "boat", "shoe", "bag", "coat")]


def _batch(ob: OrtBundle, twin, n: int = 8):
    m = ob.manifest
    rng = np.random.default_rng(0)
    size = m.preprocess.image_size
    images = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    if m.task.kind == "classify":
        y = (np.arange(n) % len(m.task.labels)).astype(np.int64)
    else:
        y = tokenize(CAPTIONS[:n], m.tokenizer.context_length).numpy().astype(np.int64)
    if m.train_input == "image_embeds":
        (embeds,) = ort_infer(ob.dir / m.graphs["image_encoder"].file, {"image": images})
        with torch.no_grad():
            ref = twin.image_encoder(torch.from_numpy(images)).numpy()
        np.testing.assert_allclose(embeds, ref, atol=TOL, rtol=0)
        return images, embeds, y
    return images, images, y


def _torch_eval(twin, x, y) -> list[np.ndarray]:
    twin.graph.eval()
    with torch.no_grad():
        out = twin.graph(torch.from_numpy(x), torch.from_numpy(y))
    out = out if isinstance(out, tuple) else (out,)
    return [o.numpy() for o in out]


def _inference_feeds(ob: OrtBundle, images, y) -> dict:
    feeds = {"image": images}
    if ob.manifest.task.kind == "contrastive":
        feeds["text"] = y
    return feeds


def _torch_inference(twin, feeds) -> list[np.ndarray]:
    twin.inference.eval()
    with torch.no_grad():
        out = twin.inference(*(torch.from_numpy(feeds[k]) for k in ("image", "text") if k in feeds))
    return [o.numpy() for o in out]


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_ort_training_matches_torch(bundle_factory, case):
    args, (lr, steps) = CASES[case]
    bundle = bundle_factory(**args)
    ob = OrtBundle(bundle)
    m = ob.manifest
    twin = torch_twin(m)
    images, x, y = _batch(ob, twin)

    # 1. at init, eval graph == torch
    for got, ref in zip(ob.evaluate(x, y), _torch_eval(twin, x, y), strict=True):
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)

    # 2. train: the loss on a fixed batch falls by more than half; only adapter tensors move
    names = [t.name for t in m.tensors]
    frozen_names = [n for n, _ in ob.state.parameters if n not in names][:20]
    before = {n: ob.param(n) for n in names + frozen_names}
    losses = ob.train(x, y, steps=steps, lr=lr)
    assert losses[-1] < 0.5 * losses[0], losses
    for t in m.tensors:
        moved = not np.array_equal(before[t.name], ob.param(t.name))
        assert moved == t.trainable, t.name
    for n in frozen_names:
        assert np.array_equal(before[n], ob.param(n)), n

    # 3. the trained adapter, loaded into torch, gives the same eval outputs
    adapter = ob.adapter()
    load_adapter_into_torch(twin.adapted.model, adapter)
    for got, ref in zip(ob.evaluate(x, y), _torch_eval(twin, x, y), strict=True):
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)

    # 4. inference graph: overriding the adapter initializers at load time gives torch's outputs
    feeds = _inference_feeds(ob, images, y)
    path = bundle / m.graphs["inference"].file
    stock = ort_infer(path, feeds)
    swapped = ort_infer(path, feeds, adapter)
    for got, ref in zip(swapped, _torch_inference(twin, feeds), strict=True):
        np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)
    assert any(not np.allclose(a, b, atol=1e-3) for a, b in zip(stock, swapped, strict=True))
