"""The model the demo starts from: fedclip-tiny pretrained the way the FMNIST benchmark does it
(`fedclip.exporters.base_pretrain`: contrastively, on a public split of Fashion-MNIST's train set,
made on the first run and cached), or random weights, or what the user gave.

The base is made in a child process (`python -m fedclip.exporters.base_pretrain`), like the export,
so torch never enters the demo's own process; its `step K/N` lines become a progress bar. A demo on
the pretrained base partitions Fashion-MNIST's official test set only (`fashion-mnist-test`), so no
agent holds an image the base was pretrained on.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from fedclip.coordinator.demo.config import DemoConfig, base_cli, flags
from fedclip.coordinator.demo.evaluation import json_result
from fedclip.coordinator.demo.launch import fashion_mnist_installed
from fedclip.coordinator.procs import ProcessGroup

BASE_MODEL = "fedclip-tiny"
ZERO_SHOT_EVAL_N = 1000  # client-pool images the base's zero-shot accuracy is measured on (info only)
_STEP = re.compile(rb"step (\d+)/(\d+)")


@dataclass(frozen=True)
class Base:
    """kind: pretrained (the built-in base), random, given (--pretrained) or bundle (--bundle)."""

    kind: str
    weights: str | None = None  # what `export --pretrained` gets
    info: dict = field(default_factory=dict)  # the built-in base's settings, cost and zero-shot accuracy
    note: str | None = None  # for the report, where the demo could not start from a pretrained model


def choose_base(cfg: DemoConfig, procs: ProcessGroup, console: Console | None) -> Base:
    if cfg.bundle is not None:
        return Base("bundle")
    if cfg.pretrained is not None:
        return Base("given", cfg.pretrained)
    if cfg.base == "random":
        return Base(
            "random", note=f"{cfg.model} has random weights (--base random): accuracies start near chance"
        )
    if cfg.model != BASE_MODEL:
        return Base(
            "random",
            note=f"{cfg.model} has random weights (no --pretrained for it): accuracies start near chance",
        )
    if not fashion_mnist_installed():
        return Base(
            "random",
            note=f"{cfg.model} has random weights: its pretrained base is made from Fashion-MNIST, which "
            "is not installed (apt-get install dataset-fashion-mnist)",
        )
    info = pretrained_base(cfg, procs, console)
    return Base("pretrained", str(info["weights"]), info)


def client_dataset(base: Base, dataset: str) -> str:
    """The data set the agents are cut from: on the built-in base, Fashion-MNIST's test set only."""
    return "fashion-mnist-test" if base.kind == "pretrained" and dataset == "fashion-mnist" else dataset


def pretrained_base(cfg: DemoConfig, procs: ProcessGroup, console: Console | None) -> dict:
    """The cached base's info (`weights`: the .pt file, `cached`: whether it was reused)."""
    argv = base_cli(*flags(cache=cfg.base_cache, steps=cfg.base_steps, eval_n=ZERO_SHOT_EVAL_N))
    child = procs.spawn("base", argv, capture=True)
    deadline = time.monotonic() + cfg.timeout
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=console is None, transient=True) as progress:
        bar = progress.add_task("base model: looking in its cache", total=None)
        while child.proc.poll() is None and time.monotonic() < deadline:
            step = _last_step(child.log_path)
            if step is not None:
                progress.update(
                    bar,
                    completed=step[0],
                    total=step[1],
                    description=f"pretraining {BASE_MODEL} (first run only, then cached)",
                )
            time.sleep(0.2)
    info = json_result(child, timeout_s=max(1.0, deadline - time.monotonic()))
    if console is not None:
        how = "reused" if info.get("cached") else f"made in {info.get('seconds', 0):.0f} s"
        zs = info.get("zero_shot_pool_accuracy")
        zs_s = f", zero-shot {100 * zs:.1f}% on Fashion-MNIST's test set" if isinstance(zs, float) else ""
        console.print(
            f"[green]done[/green] base model: {BASE_MODEL} pretrained for {info.get('steps')} steps on "
            f"{info.get('public_images')} Fashion-MNIST train images ({how}{zs_s}): {info['weights']}"
        )
    return info


def _last_step(log: Path | None) -> tuple[int, int] | None:
    if log is None or not log.is_file():
        return None
    found = _STEP.findall(log.read_bytes()[-4096:])
    return (int(found[-1][0]), int(found[-1][1])) if found else None
