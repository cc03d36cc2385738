"""Model factory: open_clip names, JSON model configs and the built-in `fedclip-tiny`.

Everything is built through open_clip's own factory so the architecture (and its preprocessing
config) is exactly open_clip's; weights are loaded afterwards so that a file that does not fit the
architecture gives a one-line ExportError instead of a stack trace.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from fedclip.sdk.errors import ExportError
from fedclip.sdk.hashing import sha256_bytes, sha256_file
from fedclip.sdk.manifest import Preprocess

log = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
BUILTIN = {p.stem: p for p in sorted(CONFIG_DIR.glob("*.json"))}
_WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")
_registered: set[str] = set()


@dataclass
class BuiltModel:
    model: torch.nn.Module  # an open_clip CLIP, float32, eval mode
    name: str
    embed_dim: int
    context_length: int
    preprocess: Preprocess
    pretrained: str | None
    weights_sha256: str | None
    config: dict  # open_clip's model config: the architecture (part of the export cache key)


def _register(name: str, cfg_path: Path) -> None:
    import open_clip

    if name in _registered:
        return
    open_clip.add_model_config(cfg_path)
    _registered.add(name)


def _resolve_name(model: str) -> str:
    """Return an open_clip model name for a built-in name, an open_clip name or a JSON file."""
    import open_clip

    if model in BUILTIN:
        _register(model, BUILTIN[model])
        return model
    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise ExportError(f"--model: model config file {model} not found")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ExportError(f"--model: {model} is not a readable JSON model config ({e})") from None
        if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ExportError(f"--model: {model} needs the keys embed_dim, vision_cfg and text_cfg")
        # open_clip keys configs by file stem; a content-derived name cannot clash with a built-in one.
        name = f"{path.stem}-{sha256_bytes(json.dumps(cfg, sort_keys=True).encode())[:12]}"
        if name not in _registered:
            # open_clip reads a config file when it is added and keeps it (later rescans skip a file
            # that is gone), so the copy under the content-derived name is removed at once: one
            # temporary folder per process was left behind before
            with tempfile.TemporaryDirectory(prefix="fedclip-cfg-") as tmp:
                (Path(tmp) / f"{name}.json").write_text(json.dumps(cfg))
                _register(name, Path(tmp) / f"{name}.json")
        return name
    if model not in open_clip.list_models():
        raise ExportError(
            f"--model: unknown model {model!r} (an open_clip name such as ViT-B-32, a JSON config file, "
            f"or one of: {', '.join(BUILTIN)})"
        )
    return model


def _model_config(name: str) -> dict:
    import open_clip

    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise ExportError(f"--model: no config for {name!r}")
    if cfg.get("custom_text") or "hf_model_name" in cfg.get("text_cfg", {}):
        raise ExportError(f"--model: {name!r} uses a custom text tower, which the exporter does not support")
    if "timm_model_name" in cfg.get("vision_cfg", {}):
        raise ExportError(f"--model: {name!r} uses a timm vision tower, which the exporter does not support")
    return cfg


def _looks_like_path(value: str) -> bool:
    return Path(value).suffix in _WEIGHT_SUFFIXES or "/" in value or Path(value).exists()


def _weights_path(name: str, pretrained: str) -> Path:
    if _looks_like_path(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise ExportError(f"--pretrained: weights file {pretrained} not found")
        return path
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not cfg:
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
        raise ExportError(
            f"--pretrained: {pretrained!r} is neither a file nor a tag of {name} (tags: {tags})"
        )
    try:
        return Path(open_clip.download_pretrained(cfg))
    except Exception as e:  # network errors come in many classes
        raise ExportError(f"--pretrained: cannot download {name}/{pretrained}: {type(e).__name__}") from None


def build_base_model(model: str, pretrained: str | None = None, seed: int = 0) -> BuiltModel:
    """Build the frozen base CLIP; without `pretrained` the weights are random (seeded)."""
    import open_clip

    name = _resolve_name(model)
    cfg = _model_config(name)
    torch.manual_seed(seed)
    try:
        clip = open_clip.create_model(name, pretrained=None, device="cpu", precision="fp32")
    except Exception as e:
        raise ExportError(f"--model: open_clip cannot build {model!r}: {e}") from None
    if type(clip).__name__ != "CLIP":
        raise ExportError(
            f"--model: {model!r} builds a {type(clip).__name__}; only open_clip CLIP is supported"
        )
    weights_sha = None
    if pretrained:
        path = _weights_path(name, pretrained)
        weights_sha = sha256_file(path)
        try:
            open_clip.load_checkpoint(clip, str(path))
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ExportError(f"--pretrained: weights {path} do not fit {model}: {first[:200]}") from None
    clip = clip.float().eval()
    for p in clip.parameters():
        p.requires_grad_(False)
    pp = getattr(clip.visual, "preprocess_cfg", {}) or {}
    size = pp.get("size", cfg["vision_cfg"].get("image_size", 224))
    size = size[0] if isinstance(size, (list, tuple)) else size
    interpolation = pp.get("interpolation", "bicubic")
    preprocess = Preprocess(
        image_size=int(size),
        mean=tuple(float(v) for v in pp.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(v) for v in pp.get("std", open_clip.OPENAI_DATASET_STD)),
        interpolation=interpolation if interpolation in ("bicubic", "bilinear") else "bicubic",
        resize_mode="squash" if pp.get("resize_mode") == "squash" else "shortest",
    )
    return BuiltModel(
        model=clip,
        name=Path(model).stem if model.endswith(".json") else model,
        embed_dim=int(cfg["embed_dim"]),
        context_length=int(clip.context_length),
        preprocess=preprocess,
        pretrained=str(pretrained) if pretrained else None,
        weights_sha256=weights_sha,
        config=cfg,
    )


def tokenizer_vocab_path() -> Path:
    """open_clip's BPE vocab, shipped in contrastive bundles for the torch-free tokenizer."""
    import open_clip.tokenizer as tok

    path = Path(tok.default_bpe())
    if not path.is_file():
        raise ExportError(f"open_clip's tokenizer vocab {path} is missing")
    return path


def copy_vocab(dest_dir: Path) -> Path:
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copyfile(tokenizer_vocab_path(), dest)
    return dest
