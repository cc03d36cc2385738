"""`fedclip-coord export`: build a training bundle. torch/open_clip load only when it runs."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    model: str = typer.Option(
        None, "--model", help="open_clip model name, JSON model config, or fedclip-tiny."
    ),
    pretrained: str = typer.Option(None, "--pretrained", help="Local weights file or open_clip tag."),
    adapter: str = typer.Option(None, "--adapter", help="lora | tri-lora [default: lora]"),
    rank: int = typer.Option(None, "--rank", help="Adapter rank r [default: 4]."),
    alpha: float = typer.Option(None, "--alpha", help="Adapter alpha (scale alpha/r) [default: 8]."),
    targets: str = typer.Option(None, "--targets", help="Comma list of q,k,v,o,mlp [default: q,v]."),
    towers: str = typer.Option(None, "--towers", help="Comma list of vision,text [default: vision,text]."),
    init: str = typer.Option(None, "--init", help="tri-lora init: ce-lora | frozen-seed."),
    train: str = typer.Option(None, "--train", help="Factors to train, e.g. A,B,C (default by init)."),
    seed: int = typer.Option(None, "--seed", help="Seed for random weights and adapter init [default: 0]."),
    task: str = typer.Option(None, "--task", help="classify | contrastive [default: classify]."),
    labels: str = typer.Option(None, "--labels", help='labels.txt (one per line) or "cat,dog,...".'),
    prompt: str = typer.Option(None, "--prompt", help='Label prompt [default: "a photo of a {}."].'),
    out: Path = typer.Option(None, "--out", help="Bundle directory to create."),
    fmt: str = typer.Option(
        None,
        "--format",
        help="Training formats: step (portable, any onnxruntime) | ort-training (ONNX Runtime "
        "training API) | both [default: both].",
    ),
    config: Path = typer.Option(None, "--config", help="export.yaml with the same fields; flags win."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON (docs/operations.md)."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Trace the step graphs even if cached."),
    cache_dir: Path = typer.Option(
        None,
        "--cache-dir",
        help="Cache of traced step graphs [default: ~/.cache/fedclip/export, or $FEDCLIP_EXPORT_CACHE_DIR].",
    ),
    cache_max_size: str = typer.Option(
        None,
        "--cache-max-size",
        help="Evict least-recently-used cached graphs beyond this size, e.g. 500M "
        "[default: 2G, or $FEDCLIP_EXPORT_CACHE_MAX].",
    ),
    cache_prune: bool = typer.Option(
        False, "--cache-prune", help="Only prune the cache to --cache-max-size and exit (no export)."
    ),
) -> None:
    """Export an open_clip model with LoRA adapters as an ONNX Runtime training bundle."""
    import logging

    from rich.console import Console

    from fedclip.exporters.export_cache import ExportCache, default_cache_dir, parse_size

    max_bytes = parse_size(cache_max_size) if cache_max_size is not None else None
    if cache_prune:  # before torch is imported: pruning needs none of it
        _prune(ExportCache(cache_dir or default_cache_dir(), max_bytes=max_bytes))
        return
    from fedclip.exporters.bundle import export_bundle
    from fedclip.exporters.config import CLI_DEFAULT_FORMAT, load_export_config

    flags = {
        "model": model,
        "pretrained": pretrained,
        "adapter": adapter,
        "rank": rank,
        "alpha": alpha,
        "targets": targets,
        "towers": towers,
        "init": init,
        "train": train,
        "seed": seed,
        "task": task,
        "labels": labels,
        "prompt": prompt,
        "out": str(out) if out is not None else None,
        "format": fmt,
    }
    cfg = load_export_config(config, flags, default_format=CLI_DEFAULT_FORMAT)
    cache = None if no_cache else ExportCache(cache_dir or default_cache_dir(), max_bytes=max_bytes)
    # open_clip warns through the root logger about random weights; we say it once, ourselves. Only
    # for the export: a process (or a test session) that runs the command keeps its own logging.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        manifest = export_bundle(cfg, show_progress=True, cache=cache)
    finally:
        root.setLevel(level)
    if not cfg.pretrained:
        Console(stderr=True).print(
            f"note: no --pretrained given: {cfg.model} has random weights (seed {cfg.seed})", highlight=False
        )
    if cache is not None and (cache.hits or cache.misses):
        Console(stderr=True, soft_wrap=True).print(
            f"export cache {cache.root}: {cache.hits} graph(s) reused, {cache.misses} traced"
            + (f", {cache.evicted} evicted (over {_size(cache.max_bytes)})" if cache.evicted else ""),
            highlight=False,
        )
    trainable = sum(1 for t in manifest.tensors if t.trainable)
    if as_json:  # the summary for scripts; fields in docs/operations.md
        from fedclip.coordinator.json_out import print_json

        print_json(
            {
                "bundle_id": manifest.bundle_id,
                "out": str(cfg.out),
                "formats": list(manifest.formats),
                "model": cfg.model,
                "pretrained": cfg.pretrained or None,
                "trainable_tensors": trainable,
            }
        )
        return
    print(
        f"bundle {manifest.bundle_id} written to {cfg.out} ({trainable} trainable adapter tensors, "
        f"formats: {', '.join(manifest.formats)})"
    )


def _size(n: int | None) -> str:
    return f"{(n or 0) / (1 << 20):,.1f} MiB"


def _prune(cache) -> None:
    """`--cache-prune`: evict down to the cap, say what stays."""
    evicted = cache.prune()
    kept = cache.entries()
    print(
        f"export cache {cache.root}: {evicted} graph(s) evicted, {len(kept)} kept "
        f"({_size(sum(size for _, size, _ in kept))} of {_size(cache.max_bytes)})"
    )
