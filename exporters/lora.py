"""LoRA / tri-LoRA injection into open_clip, the PEFT way: base weights untouched and frozen.

open_clip's attention is one `nn.MultiheadAttention` with a fused in_proj, which gives no place for
per-projection adapters. `SplitAttention` reproduces it exactly with separate q/k/v/o linears
(copies of the fused weights), so each projection can carry its own adapter. Adapter parameters are
named `<module path>.lora_A|lora_B|lora_C`, the names the ONNX initializers and adapter files carry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fedclip.sdk.errors import AdapterError, ConfigError
from fedclip.sdk.manifest import AdapterSpec

_TOWER_PREFIX = {"vision": "visual.transformer.resblocks", "text": "transformer.resblocks"}
_ATTN_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
_MLP_LINEARS = ("c_fc", "c_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha/r) * B (C) A x; `C` exists only for tri-lora."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, tri: bool = False) -> None:
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        self.lora_A = nn.Parameter(torch.zeros(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.lora_C = nn.Parameter(torch.eye(rank)) if tri else None
        self.merged = False

    # open_clip reads `mlp.c_fc.weight.dtype`; expose the base tensors as read-only views.
    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self) -> torch.Tensor:
        inner = self.lora_A if self.lora_C is None else self.lora_C @ self.lora_A
        return self.scale * (self.lora_B @ inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        h = F.linear(x, self.lora_A)
        if self.lora_C is not None:
            h = F.linear(h, self.lora_C)
        return y + self.scale * F.linear(h, self.lora_B)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta()
            self.merged = False


def _linear_copy(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.weight.requires_grad_(False)
    if lin.bias is not None:
        lin.bias.requires_grad_(False)
    return lin


class SplitAttention(nn.Module):
    """Drop-in for open_clip's `nn.MultiheadAttention(d, h)` (self-attention, no dropout)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ConfigError("lora: only plain self-attention (fused in_proj) can be split into q/k/v/o")
        d = mha.embed_dim
        self.num_heads = mha.num_heads
        self.head_dim = d // mha.num_heads
        self.batch_first = mha.batch_first
        w, b = mha.in_proj_weight, mha.in_proj_bias
        bias = (lambda i: b[i * d : (i + 1) * d]) if b is not None else (lambda i: None)
        self.q_proj = _linear_copy(w[:d], bias(0))
        self.k_proj = _linear_copy(w[d : 2 * d], bias(1))
        self.v_proj = _linear_copy(w[2 * d :], bias(2))
        self.o_proj = _linear_copy(mha.out_proj.weight, mha.out_proj.bias)

    def forward(self, query, key=None, value=None, need_weights=False, attn_mask=None, **_):
        key = query if key is None else key
        value = query if value is None else value
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        bsz, lq, d = query.shape
        ls = key.shape[1]
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(bsz, lq, h, hd).transpose(1, 2)
        k = self.k_proj(key).reshape(bsz, ls, h, hd).transpose(1, 2)
        v = self.v_proj(value).reshape(bsz, ls, h, hd).transpose(1, 2)
        scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill(
                    attn_mask, float("-inf")
                )
            if attn_mask.dim() == 3:  # [B*H, L, S], as MultiheadAttention takes it
                attn_mask = attn_mask.reshape(bsz, h, lq, ls)
            scores = scores + attn_mask
        out = scores.softmax(dim=-1) @ v
        out = self.o_proj(out.transpose(1, 2).reshape(bsz, lq, d))
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, None


def _blocks(model: nn.Module, tower: str) -> list[tuple[str, nn.Module]]:
    prefix = _TOWER_PREFIX[tower]
    blocks = cast(nn.ModuleList, model.get_submodule(prefix))  # open_clip's transformer.resblocks
    return [(f"{prefix}.{i}", blk) for i, blk in enumerate(blocks)]


def trainable_factors(spec: AdapterSpec, train: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Which of A, B, C are trained; rejects choices whose gradients are identically zero."""
    tri = spec.kind == "tri-lora"
    allowed = ("A", "B", "C") if tri else ("A", "B")
    if train:
        for f in train:
            if f not in allowed:
                raise ConfigError(
                    f"adapter.train: unknown factor {f!r} for {spec.kind} (choose from {','.join(allowed)})"
                )
        chosen = tuple(f for f in allowed if f in train)
    elif tri and spec.init == "frozen-seed":
        chosen = ("C",)
    else:
        chosen = allowed
    b_zero = not (tri and spec.init == "frozen-seed")
    if b_zero and "B" not in chosen:
        # y = W0 x + s B C A x with B = 0: dL/dA and dL/dC both carry a factor B, so they stay zero.
        raise ConfigError(
            f"adapter: with init {spec.init!r} B starts at zero, so training only {'+'.join(chosen)} "
            "gets zero gradient; train B too or use tri-lora init frozen-seed"
        )
    if tri and spec.init == "frozen-seed" and chosen != ("C",) and train:
        raise ConfigError(
            "adapter: init frozen-seed trains only C (A and B come frozen from the shared seed)"
        )
    return chosen


@torch.no_grad()
def _init_factors(mod: LoRALinear, spec: AdapterSpec, gen: torch.Generator) -> None:
    fan_in = mod.lora_A.shape[1]
    bound_a = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)), as PEFT and nn.Linear do
    mod.lora_A.copy_(torch.rand(mod.lora_A.shape, generator=gen) * 2 * bound_a - bound_a)
    if spec.kind == "tri-lora" and spec.init == "frozen-seed":
        bound_b = 1.0 / math.sqrt(spec.rank)
        mod.lora_B.copy_(torch.rand(mod.lora_B.shape, generator=gen) * 2 * bound_b - bound_b)
        assert mod.lora_C is not None  # a tri-lora spec makes tri-lora modules, which carry C
        mod.lora_C.zero_()
    else:
        mod.lora_B.zero_()
        if mod.lora_C is not None:
            mod.lora_C.copy_(torch.eye(spec.rank))


def inject_adapters(model: nn.Module, spec: AdapterSpec, train: tuple[str, ...] = ()) -> list[str]:
    """Put adapters on `model` in place; returns the adapter parameter names, sorted.

    All base parameters are frozen; the factors picked by `trainable_factors` get requires_grad.
    Initialization draws from a generator seeded with `spec.seed`, in a fixed module order, so the
    same spec always gives the same tensors (frozen-seed A/B are shared across devices that way).
    """
    factors = trainable_factors(spec, train)
    for p in model.parameters():
        p.requires_grad_(False)
    tri = spec.kind == "tri-lora"
    wrapped: list[tuple[str, LoRALinear]] = []
    for tower in ("vision", "text"):
        if tower not in spec.towers:
            continue
        for path, blk in _blocks(model, tower):
            attn_targets = [t for t in ("q", "k", "v", "o") if t in spec.targets]
            if not isinstance(blk.attn, SplitAttention):
                if not isinstance(blk.attn, nn.MultiheadAttention):
                    raise ConfigError(
                        f"lora: {path}.attn is {type(blk.attn).__name__}, not MultiheadAttention"
                    )
                blk.attn = SplitAttention(blk.attn)
            for t in attn_targets:
                name = _ATTN_TARGETS[t]
                lin = LoRALinear(getattr(blk.attn, name), spec.rank, spec.alpha, tri)
                setattr(blk.attn, name, lin)
                wrapped.append((f"{path}.attn.{name}", lin))
            if "mlp" in spec.targets:
                for name in _MLP_LINEARS:
                    lin = LoRALinear(getattr(blk.mlp, name), spec.rank, spec.alpha, tri)
                    setattr(blk.mlp, name, lin)
                    wrapped.append((f"{path}.mlp.{name}", lin))
    gen = torch.Generator().manual_seed(spec.seed)
    names = []
    for path, lin in sorted(wrapped, key=lambda x: x[0]):
        _init_factors(lin, spec, gen)
        for f in ("A", "B", "C"):
            p = getattr(lin, f"lora_{f}")
            if p is None:
                continue
            p.requires_grad_(f in factors)
            names.append(f"{path}.lora_{f}")
    return sorted(names)


def adapter_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_tensors(model: nn.Module) -> dict[str, np.ndarray]:
    """Every adapter factor as numpy, by torch parameter name."""
    return {
        name: p.detach().cpu().numpy().copy()
        for name, p in model.named_parameters()
        if name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_C")
    }


@torch.no_grad()
def load_adapter_into_torch(model: nn.Module, tensors: Mapping[str, np.ndarray]) -> None:
    """Copy adapter tensors (names as in the adapter file) into the adapted model."""
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        p = params.get(name)
        if p is None or name.rsplit(".", 1)[-1] not in ("lora_A", "lora_B", "lora_C"):
            raise AdapterError(f"adapter tensor {name!r} is not an adapter parameter of this model")
        arr = torch.as_tensor(np.asarray(value), dtype=p.dtype)
        if tuple(arr.shape) != tuple(p.shape):
            raise AdapterError(f"adapter tensor {name!r}: shape {tuple(arr.shape)} != {tuple(p.shape)}")
        mods = adapter_modules(model)
        owner = mods.get(name.rsplit(".", 1)[0])
        if owner is not None and owner.merged:
            raise AdapterError(f"{name}: unmerge the model before loading an adapter")
        p.copy_(arr)


def merge_adapters(model: nn.Module) -> None:
    for m in adapter_modules(model).values():
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for m in adapter_modules(model).values():
        m.unmerge()
