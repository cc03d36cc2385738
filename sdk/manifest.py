"""The bundle manifest: the one contract between export (coordinator side) and the device.

Every name and shape the device uses comes from here (habit 3). The manifest is YAML in the bundle as
`manifest.yaml`; `bundle_id` is the sha256 of the canonical manifest with `bundle_id` blanked, which
covers every file's sha256, so equal inputs give equal ids.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import yaml

from fedclip.sdk.config import from_mapping, to_mapping
from fedclip.sdk.errors import BundleError, ConfigError
from fedclip.sdk.hashing import sha256_bytes, sha256_file

# 2: classify training graphs take `label_bias` (balanced-softmax training). Agents read 1 and 2;
# an agent that knows only 1 refuses a bundle of 2 with one line instead of failing mid-round.
FORMAT_VERSION = 2
READ_FORMATS = (1, 2)
# The classify training graphs' per-sample logit offset [batch, labels] (docs/internals.md).
LABEL_BIAS = "label_bias"
MANIFEST_NAME = "manifest.yaml"

ADAPTER_KINDS = ("lora", "tri-lora")
TARGETS = ("q", "k", "v", "o", "mlp")
TOWERS = ("vision", "text")
# The graphs each training format needs (see `Manifest.formats`).
ORT_TRAINING_GRAPHS = ("training", "eval", "optimizer")
STEP_GRAPHS = ("step", "step_eval")
TRAINING_FORMATS = ("ort-training", "step")
SHARED = "shared"  # the files every device needs, whatever it trains with (inference, tokenizer, ...)


@dataclass(frozen=True)
class AdapterSpec:
    kind: Literal["lora", "tri-lora"]
    rank: int
    alpha: float
    targets: tuple[str, ...]
    towers: tuple[str, ...]
    # tri-lora only: "ce-lora" = A random, C identity, B zero, A/B/C trained;
    # "frozen-seed" = A, B random from `seed` and frozen, only C trained.
    init: Literal["ce-lora", "frozen-seed"] = "ce-lora"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ConfigError(f"adapter.rank: must be > 0, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"adapter.alpha: must be > 0, got {self.alpha}")
        for t in self.targets:
            if t not in TARGETS:
                raise ConfigError(f"adapter.targets: unknown target {t!r} (choose from {','.join(TARGETS)})")
        if not self.targets:
            raise ConfigError("adapter.targets: at least one target is needed")
        for t in self.towers:
            if t not in TOWERS:
                raise ConfigError(f"adapter.towers: unknown tower {t!r} (choose from {','.join(TOWERS)})")
        if not self.towers:
            raise ConfigError("adapter.towers: at least one tower is needed")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class TaskSpec:
    kind: Literal["classify", "contrastive"]
    labels: tuple[str, ...] = ()
    prompt: str = "a photo of a {}."

    def __post_init__(self) -> None:
        if self.kind == "classify":
            if not self.labels:
                raise ConfigError("task.labels: classify needs at least one label")
            if len(set(self.labels)) != len(self.labels):
                raise ConfigError("task.labels: labels must be unique")
            if any(not lab.strip() for lab in self.labels):
                raise ConfigError("task.labels: empty label")
            if "{}" not in self.prompt:
                raise ConfigError(f"task.prompt: must contain '{{}}' for the label, got {self.prompt!r}")

    def prompts(self) -> list[str]:
        return [self.prompt.format(label) for label in self.labels]


def safe_relpath(rel: str, where: str) -> PurePosixPath:
    """A manifest's names stay inside the bundle folder: no absolute paths, no `..`, no dot-names."""
    p = PurePosixPath(rel) if isinstance(rel, str) else None
    if p is None or not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or rel.startswith("."):
        raise BundleError(f"{where}: manifest names a file outside its folder: {rel!r}")
    return p


@dataclass(frozen=True)
class Preprocess:
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    resize_mode: Literal["shortest", "squash"] = "shortest"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    trainable: bool = True
    # Exchanged tensors travel to the coordinator; the others stay on the device (tri-lora A, B).
    exchanged: bool = True


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class BaseModel:
    name: str
    embed_dim: int
    pretrained: str | None = None
    weights_sha256: str | None = None


@dataclass(frozen=True)
class TokenizerSpec:
    file: str
    context_length: int


@dataclass(frozen=True)
class Manifest:
    format_version: int
    base_model: BaseModel
    adapter: AdapterSpec
    task: TaskSpec
    preprocess: Preprocess
    tensors: tuple[TensorSpec, ...]
    # Keys: "training", "eval", "optimizer", "inference", and for text-tower-only adapters
    # "image_encoder"; "step" for the portable training graph when exported.
    graphs: dict[str, GraphSpec]
    # What the training graph consumes: raw pixels, or cached image embeddings (no adapter on vision).
    train_input: Literal["image", "image_embeds"] = "image"
    # The ORT training checkpoint; None in a bundle exported with the step format only.
    checkpoint: str | None = "checkpoint"
    tokenizer: TokenizerSpec | None = None
    # Starting values of the trainable tensors (safetensors) for trainers without an ORT checkpoint
    # (the portable `step` graph); None when the bundle has no step graph.
    initial_tensors: str | None = None
    tools: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    bundle_id: str = ""

    # ---- views -------------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    @property
    def trainable(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.trainable)

    @property
    def exchanged(self) -> tuple[TensorSpec, ...]:
        return tuple(t for t in self.tensors if t.exchanged)

    @property
    def takes_label_bias(self) -> bool:
        """Its training graphs take `label_bias` (every graph a trainer runs: both formats agree)."""
        train = [g for k, g in self.graphs.items() if k in ("training", "step")]
        return bool(train) and all(LABEL_BIAS in g.inputs for g in train)

    @property
    def formats(self) -> tuple[str, ...]:
        """The training formats the bundle carries: "ort-training" (ORT artifacts), "step" (portable).

        Derived from `graphs` rather than stored, so bundles exported before the step format keep
        their bundle id.
        """
        out = []
        if self.checkpoint and all(k in self.graphs for k in ORT_TRAINING_GRAPHS):
            out.append("ort-training")
        if all(k in self.graphs for k in STEP_GRAPHS) and self.initial_tensors:
            out.append("step")
        return tuple(out)

    def format_files(self) -> dict[str, tuple[str, ...]]:
        """Which of `files` belong to which training format, and which are `SHARED` (every device).

        A format owns its graph files (and anything named after them, like external data) and its
        starting state: the ORT checkpoint for "ort-training", the initial tensors for "step". The
        rest, the shared weights file that the inference graph also reads among it, is shared.
        """
        own: dict[str, set[str]] = {}
        for fmt, keys in (("ort-training", ORT_TRAINING_GRAPHS), ("step", STEP_GRAPHS)):
            prefixes = [self.graphs[k].file for k in keys if k in self.graphs]
            start = self.checkpoint if fmt == "ort-training" else self.initial_tensors
            if start:
                prefixes.append(start)
            own[fmt] = {
                rel
                for rel in self.files
                if any(rel == p or rel.startswith((p + "/", p + ".")) for p in prefixes)
            }
        taken = set().union(*own.values())
        out = {fmt: tuple(sorted(names)) for fmt, names in own.items() if names}
        out[SHARED] = tuple(sorted(set(self.files) - taken))
        return out

    def files_for(self, formats: tuple[str, ...] | list[str] | None) -> dict[str, str]:
        """The files (name -> sha256) a device running `formats` needs; None: every file."""
        if formats is None:
            return dict(self.files)
        unknown = [f for f in formats if f not in TRAINING_FORMATS]
        if unknown:
            raise BundleError(f"unknown format {unknown[0]!r} (choose from {', '.join(TRAINING_FORMATS)})")
        groups = self.format_files()
        names = set(groups[SHARED]).union(*(groups.get(f, ()) for f in formats))
        return {rel: digest for rel, digest in self.files.items() if rel in names}

    def present_formats(self, bundle_dir: str | Path) -> tuple[str, ...]:
        """The training formats whose files are all in `bundle_dir` (a bundle fetched for one format
        has only that one's); use with `verify`, which checks the files that are there."""
        bundle_dir = Path(bundle_dir)
        groups = self.format_files()
        return tuple(
            f for f in self.formats if all((bundle_dir / rel).is_file() for rel in groups.get(f, ()))
        )

    # ---- io ----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return to_mapping(self)

    def file_names(self) -> list[str]:
        """Every path the manifest names inside the bundle folder."""
        names = [*self.files, *(g.file for g in self.graphs.values())]
        names += [n for n in (self.checkpoint, self.initial_tensors) if n]
        if self.tokenizer is not None:
            names.append(self.tokenizer.file)
        return names

    @classmethod
    def from_dict(cls, data: dict, where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(data, dict):
            raise BundleError(f"{where}: not a mapping")
        version = data.get("format_version")
        if version not in READ_FORMATS or isinstance(version, bool):
            raise BundleError(
                f"{where}: format_version {version!r} is not supported "
                f"(expected one of {', '.join(map(str, READ_FORMATS))})"
            )
        try:
            manifest = from_mapping(cls, data, where)
        except ConfigError as e:
            raise BundleError(str(e)) from None
        for rel in manifest.file_names():
            safe_relpath(rel, where)
        return manifest

    def canonical_id(self) -> str:
        # Hash the manifest as a reader will load it: an int given for a float field (alpha=8) or a
        # list for a tuple would otherwise hash differently after the YAML round trip.
        body = dataclasses.replace(self, bundle_id="").to_dict()
        body = Manifest.from_dict(body).to_dict()
        return sha256_bytes(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())

    @classmethod
    def load(cls, bundle_dir: str | Path, verify: bool = True) -> Manifest:
        """Read `bundle_dir/manifest.yaml`; with `verify`, refuse the bundle if any hash differs."""
        bundle_dir = Path(bundle_dir)
        path = bundle_dir / MANIFEST_NAME
        if not path.is_file():
            raise BundleError(f"{bundle_dir}: not a fedclip bundle (no {MANIFEST_NAME})")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError:
            raise BundleError(f"{path}: manifest is not valid YAML") from None
        manifest = cls.from_dict(data, str(path))
        if verify:
            manifest.verify(bundle_dir)
        return manifest

    def verify(self, bundle_dir: str | Path) -> None:
        bundle_dir = Path(bundle_dir)
        if self.canonical_id() != self.bundle_id:
            raise BundleError(f"{bundle_dir}: manifest was modified (bundle id does not match its content)")
        root = bundle_dir.resolve()
        # A device may have fetched only the formats it trains with (`fetch_bundle(formats=...)`):
        # a format is either wholly there or wholly absent; the shared files must all be there.
        groups = self.format_files()
        absent = {
            rel
            for fmt, names in groups.items()
            if fmt != SHARED and not any((bundle_dir / r).exists() for r in names)
            for rel in names
        }
        for rel, digest in sorted(self.files.items()):
            p = bundle_dir / rel
            if rel in absent:
                continue
            if p.exists() and not p.resolve().is_relative_to(root):  # a symlink out of the folder
                raise BundleError(f"{bundle_dir}: file {rel} listed in the manifest leads outside the bundle")
            if not p.is_file():
                raise BundleError(f"{bundle_dir}: file {rel} listed in the manifest is missing")
            if sha256_file(p) != digest:
                raise BundleError(f"{bundle_dir}: file {rel} is corrupt (sha256 mismatch)")

    def seal(self, bundle_dir: str | Path) -> Manifest:
        """Hash every file in `bundle_dir` (but the manifest), set `files` and `bundle_id`, write it."""
        bundle_dir = Path(bundle_dir)
        files = {
            p.relative_to(bundle_dir).as_posix(): sha256_file(p)
            for p in sorted(bundle_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }
        sealed = dataclasses.replace(self, files=files, bundle_id="")
        sealed = dataclasses.replace(sealed, bundle_id=sealed.canonical_id())
        (bundle_dir / MANIFEST_NAME).write_text(yaml.safe_dump(sealed.to_dict(), sort_keys=True))
        return sealed
