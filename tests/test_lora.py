"""LoRA / tri-LoRA injection in PyTorch: exact attention split, identity at init, merge, names."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedclip.exporters.bundle import build_adapted_model
from fedclip.exporters.lora import (
    SplitAttention,
    adapter_tensors,
    load_adapter_into_torch,
    merge_adapters,
    trainable_factors,
    unmerge_adapters,
)
from fedclip.exporters.models import build_base_model
from fedclip.sdk.errors import AdapterError, ConfigError
from fedclip.sdk.manifest import AdapterSpec

ALL = ("q", "k", "v", "o", "mlp")
SPECS = {
    "lora": AdapterSpec("lora", 4, 8.0, ALL, ("vision", "text")),
    "tri-ce": AdapterSpec("tri-lora", 4, 8.0, ALL, ("vision", "text")),
    "tri-frozen": AdapterSpec("tri-lora", 4, 8.0, ALL, ("vision", "text"), init="frozen-seed"),
}


def _inputs():
    g = torch.Generator().manual_seed(3)
    return torch.randn(3, 3, 32, 32, generator=g), torch.randint(1, 49000, (3, 32), generator=g)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "per-head"])
def test_split_attention_reproduces_multihead_attention(batch_first, mask):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    with torch.no_grad():
        mha.in_proj_bias.normal_()
    split = SplitAttention(mha)
    n, length = 2, 5
    x = torch.randn(n, length, 16) if batch_first else torch.randn(length, n, 16)
    attn_mask = None
    if mask == "causal":
        attn_mask = torch.full((length, length), float("-inf")).triu(1)
    elif mask == "bool":
        attn_mask = torch.ones(length, length, dtype=torch.bool).triu(1)
    elif mask == "per-head":
        attn_mask = torch.randn(n * 4, length, length)
    with torch.no_grad():
        ref = mha(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        got = split(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", list(SPECS))
def test_adapted_model_equals_base_at_init(kind):
    base = build_base_model("fedclip-tiny", seed=0).model
    adapted = build_adapted_model("fedclip-tiny", SPECS[kind])
    img, txt = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(adapted.model.encode_image(img), base.encode_image(img), atol=1e-5, rtol=0)
        torch.testing.assert_close(adapted.model.encode_text(txt), base.encode_text(txt), atol=1e-5, rtol=0)
    # ...and the adapters are really in the forward path: a nonzero delta changes the outputs
    with torch.no_grad():
        for name, p in adapted.model.named_parameters():
            if name.endswith(("lora_B", "lora_C")):
                p.normal_(0, 0.5)
        assert not torch.allclose(adapted.model.encode_image(img), base.encode_image(img), atol=1e-3)
        assert not torch.allclose(adapted.model.encode_text(txt), base.encode_text(txt), atol=1e-3)


@pytest.mark.parametrize("kind, trained", [("lora", "AB"), ("tri-ce", "ABC"), ("tri-frozen", "C")])
def test_only_adapter_factors_are_trainable_and_named_like_torch(kind, trained):
    adapted = build_adapted_model("fedclip-tiny", SPECS[kind])
    grads = sorted(n for n, p in adapted.model.named_parameters() if p.requires_grad)
    assert grads == sorted(n for n in adapted.names if n[-1] in trained)
    assert "visual.transformer.resblocks.0.attn.q_proj.lora_A" in adapted.names
    assert "transformer.resblocks.1.mlp.c_proj.lora_B" in adapted.names
    # 2 towers x 2 blocks x (4 attention + 2 mlp) linears x factors
    assert len(adapted.names) == 2 * 2 * 6 * (3 if kind.startswith("tri") else 2)
    # the gradient reaches every trainable factor (B zero would starve A and C in C-only training)
    img, txt = _inputs()
    out = adapted.model.encode_image(img).sum() + adapted.model.encode_text(txt).sum()
    if kind == "lora" or kind == "tri-ce":
        # with B = 0 only B gets gradient on the first step; nudge B to check the path to A and C
        with torch.no_grad():
            for n, p in adapted.model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.1)
        out = adapted.model.encode_image(img).sum() + adapted.model.encode_text(txt).sum()
    out.backward()
    for n, p in adapted.model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n


def test_zero_gradient_combinations_are_rejected():
    with pytest.raises(ConfigError, match="zero"):
        trainable_factors(SPECS["tri-ce"], ("C",))
    with pytest.raises(ConfigError, match="zero"):
        trainable_factors(SPECS["lora"], ("A",))
    with pytest.raises(ConfigError, match="frozen-seed"):
        trainable_factors(SPECS["tri-frozen"], ("A", "C"))
    assert trainable_factors(SPECS["tri-frozen"]) == ("C",)
    assert trainable_factors(SPECS["tri-ce"]) == ("A", "B", "C")


def test_frozen_seed_factors_come_from_the_seed():
    a = adapter_tensors(build_adapted_model("fedclip-tiny", SPECS["tri-frozen"]).model)
    b = adapter_tensors(build_adapted_model("fedclip-tiny", SPECS["tri-frozen"]).model)
    other = AdapterSpec("tri-lora", 4, 8.0, ALL, ("vision", "text"), init="frozen-seed", seed=1)
    c = adapter_tensors(build_adapted_model("fedclip-tiny", other).model)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
        if name.endswith("lora_C"):
            assert not a[name].any()
        else:
            assert a[name].any() and not np.array_equal(a[name], c[name])


def test_merge_and_unmerge():
    adapted = build_adapted_model("fedclip-tiny", SPECS["tri-ce"])
    model = adapted.model
    before = copy.deepcopy(model.state_dict())
    rng = np.random.default_rng(0)
    load_adapter_into_torch(
        model, {n: rng.normal(0, 0.1, v.shape).astype(np.float32) for n, v in adapter_tensors(model).items()}
    )
    img, txt = _inputs()
    with torch.no_grad():
        ref = model.encode_image(img), model.encode_text(txt)
        merge_adapters(model)
        merged = model.encode_image(img), model.encode_text(txt)
        unmerge_adapters(model)
        back = model.encode_image(img), model.encode_text(txt)
    for r, m, b in zip(ref, merged, back, strict=True):
        torch.testing.assert_close(m, r, atol=1e-4, rtol=0)
        torch.testing.assert_close(b, r, atol=1e-5, rtol=0)
    for name, value in model.state_dict().items():
        if name.endswith(".base.weight"):
            torch.testing.assert_close(value, before[name], atol=1e-6, rtol=0)


def test_load_adapter_rejects_unknown_names_and_shapes():
    model = build_adapted_model("fedclip-tiny", SPECS["lora"]).model
    good = adapter_tensors(model)
    name = next(iter(good))
    with pytest.raises(AdapterError, match="not an adapter"):
        load_adapter_into_torch(model, {"visual.proj": np.zeros((64, 64), np.float32)})
    with pytest.raises(AdapterError, match="not an adapter"):
        load_adapter_into_torch(model, {"nope.lora_A": good[name]})
    with pytest.raises(AdapterError, match="shape"):
        load_adapter_into_torch(model, {name: np.zeros((1, 1), np.float32)})
