"""ONNX graphs vs the PyTorch adapted model: equal outputs before and after ORT training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures_bundle import OrtBundle, ort_infer

from fedclip.exporters import tasks
from fedclip.exporters.bundle import build_adapted_model, load_adapter_into_torch, tokenize, torch_twin
from fedclip.sdk.manifest import AdapterSpec

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


# ---- trimmed label prompts vs open_clip's own full-context text tower ---------------------------
PROMPTS = ["a photo of a cat.", "a photo of a t-shirt or top, a type of clothing.", "a dog"]


def _open_clip_classify(clip, tokens: torch.Tensor, embeds: torch.Tensor, labels: torch.Tensor):
    """The classify loss and logits as open_clip computes them, prompts at the full context."""
    text = F.normalize(clip.encode_text(tokens), dim=-1)
    logits = clip.logit_scale.exp() * F.normalize(embeds, dim=-1) @ text.t()
    return F.cross_entropy(logits, labels), logits


def test_trimmed_label_prompts_match_open_clip_full_context():
    spec = AdapterSpec("lora", 4, 8.0, ("q", "k", "v", "o", "mlp"), ("text",))
    clip = build_adapted_model("fedclip-tiny", spec).model
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # nonzero B, so the adapter is on the path being compared
        for name, p in clip.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    full = tokenize(PROMPTS, clip.context_length)
    graph = tasks.ClassifyGraph(clip, full, from_embeds=True, text_adapted=True)
    # the longest prompt ends well inside the context, so the graph really runs on fewer tokens
    assert graph.label_tokens.shape[1] == int(full.argmax(dim=-1).max()) + 1 < clip.context_length
    assert torch.equal(graph.label_tokens, full[:, : graph.label_tokens.shape[1]])

    embeds = torch.randn(5, clip.text_projection.shape[1], generator=gen)
    labels = torch.tensor([0, 1, 2, 1, 0])
    trainable = [p for n, p in clip.named_parameters() if "lora_" in n]
    loss, logits = graph(embeds, labels)
    grads = torch.autograd.grad(loss, trainable)
    ref_loss, ref_logits = _open_clip_classify(clip, full, embeds, labels)
    ref_grads = torch.autograd.grad(ref_loss, trainable)

    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=0)
    assert any(g.abs().max() > 1e-4 for g in ref_grads)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=0)


def test_ort_text_adapted_classify_matches_open_clip_full_context(bundle_factory):
    args, _ = CASES["lora-classify-text"]
    ob = OrtBundle(bundle_factory(**args))
    m = ob.manifest
    twin = torch_twin(m)
    images, x, y = _batch(ob, twin)
    clip = twin.adapted.model.eval()
    full = tokenize(m.task.prompts(), clip.context_length)
    with torch.no_grad():
        ref = _open_clip_classify(clip, full, torch.from_numpy(x), torch.from_numpy(y))
    for got, r in zip(ob.evaluate(x, y), ref, strict=True):
        np.testing.assert_allclose(got, r.numpy(), atol=1e-5, rtol=0)
    # the inference graph embeds the images itself; its logits match open_clip's too
    (logits, embeds) = ort_infer(ob.dir / m.graphs["inference"].file, {"image": images})
    with torch.no_grad():
        _, ref_logits = _open_clip_classify(
            clip, full, clip.encode_image(torch.from_numpy(images)), torch.from_numpy(y)
        )
    np.testing.assert_allclose(logits, ref_logits.numpy(), atol=1e-5, rtol=0)
