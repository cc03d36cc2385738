"""`ExportConfig`: what `fedclip-coord export` builds, from flags and/or `--config export.yaml`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fedclip.sdk.config import from_mapping, load_yaml
from fedclip.sdk.errors import ConfigError

# `--format`: which training formats the bundle carries (see Manifest.formats).
FORMATS = {"step": ("step",), "ort-training": ("ort-training",), "both": ("ort-training", "step")}


@dataclass(frozen=True)
class ExportConfig:
    model: str
    out: str
    pretrained: str | None = None
    adapter: Literal["lora", "tri-lora"] = "lora"
    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = ("q", "v")
    towers: tuple[str, ...] = ("vision", "text")
    init: Literal["ce-lora", "frozen-seed"] = "ce-lora"
    # Which factors (A, B, C) to train; empty: the init's default (frozen-seed: C, else all).
    train: tuple[str, ...] = ()
    seed: int = 0
    task: Literal["classify", "contrastive"] = "classify"
    labels: tuple[str, ...] = ()
    prompt: str = "a photo of a {}."
    # step: the portable step graph only (any onnxruntime trains it); ort-training: ONNX Runtime
    # training artifacts only; both. `fedclip-coord export` defaults to both (CLI_DEFAULT_FORMAT);
    # library callers keep the original ORT-only bundles unless they ask.
    format: Literal["step", "ort-training", "both"] = "ort-training"

    @property
    def formats(self) -> tuple[str, ...]:
        return FORMATS[self.format]


def parse_labels(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`labels.txt` (one label a line) or `"cat,dog"` or a list; returns the label tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        path = Path(value)
        if path.suffix == ".txt" or path.is_file():
            if not path.is_file():
                raise ConfigError(f"labels: labels file {value} not found")
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"labels: cannot read {value} ({e})") from None
            return tuple(line.strip() for line in lines if line.strip())
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value)
    raise ConfigError(f"labels: expected a file, a comma list or a list, got {type(value).__name__}")


CLI_DEFAULT_FORMAT = "both"


def load_export_config(
    path: str | Path | None, overrides: Mapping[str, Any], default_format: str | None = None
) -> ExportConfig:
    """YAML file (optional) + flags; flags that were given win, then the file, then
    `default_format` (the CLI's) for `format`, then the dataclass defaults."""
    data: dict[str, Any] = dict(load_yaml(path)) if path else {}
    if default_format is not None:
        data.setdefault("format", default_format)
    data.update({k: v for k, v in overrides.items() if v is not None})
    if "labels" in data:
        data["labels"] = parse_labels(data["labels"])
    return from_mapping(ExportConfig, data, where=str(path) if path else "export")
