"""Adapters outside fedclip: a merged open_clip checkpoint, or a LoRA file mapped to open_clip names.

`write_open_clip` merges an adapter version into the bundle's base model and saves a state dict
that plain open_clip loads: `open_clip.create_model(NAME, pretrained=FILE)` (for a model open_clip
does not ship, like fedclip-tiny, the config written next to it is registered first with
`open_clip.add_model_config`). fedclip's split attention (q/k/v/o projections) is fused back into
open_clip's `attn.in_proj_weight` / `attn.out_proj`, so the checkpoint has exactly open_clip's keys;
the merged model is loaded with `strict=True` before anything is written.

`write_lora` keeps the factors apart: a safetensors file with fedclip's tensor names and, in its
metadata, the open_clip weight (and row range) each adapted linear layer lands in:

    W[rows] += scale * B @ A            (lora;  scale = alpha / rank)
    W[rows] += scale * B @ C @ A        (tri-lora)

where `<module>.lora_A`, `.lora_B` (and `.lora_C`) are the file's tensors and the mapping
(`fedclip_open_clip_mapping`, JSON) gives `<module> -> {"weight": open_clip name, "rows": [lo, hi]}`;
`apply_lora` is that formula, and docs/deploy.md spells it out. Factors a version does not carry
(tri-lora's A and B stay on the devices) are the bundle's initial, seeded ones.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedclip.exporters.bundle import AdaptedModel, build_adapted_model
from fedclip.exporters.lora import adapter_modules, adapter_tensors, load_adapter_into_torch, merge_adapters
from fedclip.exporters.models import BUILTIN, build_base_model
from fedclip.sdk.adapters import AdapterMeta, encode_tensors
from fedclip.sdk.errors import AdapterError, ExportError
from fedclip.sdk.manifest import Manifest

LORA_FORMAT = "1"
_FACTORS = ("lora_A", "lora_B", "lora_C")
_SPLIT = re.compile(r"^(?P<attn>.+\.attn)\.(?P<which>[qkvo])_proj\.(?P<kind>weight|bias)$")
_QKV = ("q", "k", "v")


def adapted_model(
    manifest: Manifest, tensors: Mapping[str, np.ndarray], model: str | None = None
) -> AdaptedModel:
    """The bundle's PyTorch model (same seed: same base and initial factors) with `tensors` loaded."""
    adapted = build_adapted_model(
        model or manifest.base_model.name, manifest.adapter, manifest.base_model.pretrained
    )
    unknown = sorted(set(tensors) - set(adapted.names))
    if unknown:
        raise AdapterError(f"adapter tensor {unknown[0]!r} is not in the bundle's adapter")
    load_adapter_into_torch(adapted.model, tensors)
    return adapted


def merged_state_dict(adapted: AdaptedModel) -> dict[str, torch.Tensor]:
    """open_clip's own state dict of the merged model (the adapted model is merged in place)."""
    for name, p in adapted.model.named_parameters():
        if name.rsplit(".", 1)[-1] in _FACTORS and not torch.isfinite(p).all():
            raise AdapterError(f"{name}: non-finite values; refusing to merge")
    merge_adapters(adapted.model)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for name, t in adapted.model.state_dict().items():
        if name.rsplit(".", 1)[-1] in _FACTORS:
            continue
        name = name.replace(".base.", ".")  # LoRALinear keeps the frozen layer as `.base`
        m = _SPLIT.match(name)
        if m is None:
            out[name] = t
        elif m["which"] == "o":
            out[f"{m['attn']}.out_proj.{m['kind']}"] = t
        else:
            qkv.setdefault((m["attn"], m["kind"]), {})[m["which"]] = t
    for (attn, kind), parts in qkv.items():
        out[f"{attn}.in_proj_{kind}"] = torch.cat([parts[w] for w in _QKV])
    bad = [k for k, v in out.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise AdapterError(f"merged weight {bad[0]} is not finite; refusing to write it")
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def _plain_model(manifest: Manifest, model: str | None) -> torch.nn.Module:
    return build_base_model(model or manifest.base_model.name, manifest.base_model.pretrained).model


def write_open_clip(
    manifest: Manifest, tensors: Mapping[str, np.ndarray], out: str | Path, model: str | None = None
) -> list[Path]:
    """Write the merged checkpoint at `out` (and `<out stem>.json`, the model config, when open_clip
    does not ship the model); returns the files written."""
    import open_clip

    out = Path(out)
    state = merged_state_dict(adapted_model(manifest, tensors, model))
    plain = _plain_model(manifest, model)
    try:
        plain.load_state_dict(state, strict=True)  # exactly open_clip's keys and shapes
    except RuntimeError as e:
        raise ExportError(
            f"merged checkpoint does not fit open_clip's {manifest.base_model.name}: {str(e)[:200]}"
        ) from None
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    written = [out]
    name = manifest.base_model.name
    if name in BUILTIN or name not in open_clip.list_models():
        cfg = out.with_name(f"{name}.json")
        cfg.write_text(json.dumps(open_clip.get_model_config(name), indent=2, sort_keys=True))
        written.append(cfg)
    return written


def open_clip_mapping(adapted: AdaptedModel) -> dict[str, dict]:
    """Adapted linear layer (fedclip name) -> the open_clip weight and rows it adds to."""
    out = {}
    for path, mod in sorted(adapter_modules(adapted.model).items()):
        m = _SPLIT.match(f"{path}.weight")
        if m is None:
            out[path] = {"weight": f"{path}.weight", "rows": [0, mod.out_features]}
        elif m["which"] == "o":
            out[path] = {"weight": f"{m['attn']}.out_proj.weight", "rows": [0, mod.out_features]}
        else:
            d = mod.out_features
            i = _QKV.index(m["which"])
            out[path] = {"weight": f"{m['attn']}.in_proj_weight", "rows": [i * d, (i + 1) * d]}
    return out


def write_lora(
    manifest: Manifest,
    tensors: Mapping[str, np.ndarray],
    meta: AdapterMeta,
    out: str | Path,
    model: str | None = None,
) -> Path:
    """A LoRA safetensors: every factor by fedclip name, the open_clip mapping in its metadata."""
    adapted = adapted_model(manifest, tensors, model)
    spec = manifest.adapter
    metadata = {
        "fedclip_lora_format": LORA_FORMAT,
        "fedclip_open_clip_mapping": json.dumps(open_clip_mapping(adapted), sort_keys=True),
        "kind": spec.kind,
        "rank": str(spec.rank),
        "alpha": repr(float(spec.alpha)),
        "scale": repr(float(spec.scale)),
        "base_model": manifest.base_model.name,
        "pretrained": manifest.base_model.pretrained or "",
        "bundle_id": manifest.bundle_id,
        "version": meta.version,
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(encode_tensors(adapter_tensors(adapted.model), metadata))
    return out


@torch.no_grad()
def apply_lora(
    state: dict[str, torch.Tensor], tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> None:
    """Add a LoRA file's deltas to a plain open_clip state dict, in place (the documented formula)."""
    if metadata.get("fedclip_lora_format") != LORA_FORMAT:
        raise AdapterError(f"not a fedclip LoRA file of format {LORA_FORMAT}")
    scale = float(metadata["scale"])
    for module, where in json.loads(metadata["fedclip_open_clip_mapping"]).items():
        a = torch.as_tensor(np.asarray(tensors[f"{module}.lora_A"]))
        b = torch.as_tensor(np.asarray(tensors[f"{module}.lora_B"]))
        c = tensors.get(f"{module}.lora_C")
        inner = a if c is None else torch.as_tensor(np.asarray(c)) @ a
        lo, hi = where["rows"]
        state[where["weight"]][lo:hi] += scale * (b @ inner)
