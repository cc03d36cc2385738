"""The typer options `fedclip-agent`'s offline commands share (`local_cmd`, `serve_cmd`): one help text each.

Only typer here: importing it costs the agent nothing it does not already load for its commands.
"""

from __future__ import annotations

import typer

BUNDLE = typer.Option(..., "--bundle", help="Bundle folder made by `fedclip-coord export`.")
DATA = typer.Option(..., "--data", help="Image folder (one sub-folder per label), CSV or JSONL.")
DEVICE = typer.Option(
    "auto", "--device", help="auto (CUDA where the onnxruntime build has it, else CPU) | cpu | cuda."
)
BACKEND = typer.Option(
    "auto",
    "--backend",
    help="auto | step (portable step graph, any onnxruntime) | ort-training (ONNX Runtime training "
    "API); auto picks ort-training when it is installed and the bundle has its artifacts.",
)
THREADS = typer.Option(None, "--threads", min=1, help="CPU threads for ONNX Runtime (default: all cores).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars, warnings only.")
JSON = typer.Option(False, "--json", help="Print the metrics as one JSON object on stdout.")
ADAPTER = typer.Option(
    None, "--adapter", help="Adapter (.safetensors) to load; default: the bundle's initial one."
)
PRIOR = typer.Option(
    1.0,
    "--prior-weight",
    min=0.0,
    max=10.0,
    help="A balanced-softmax adapter carries the label prior it was trained without: this much of it "
    "is added to the logits (1: the device's own label mix, 0: every label alike).",
)
OPEN_SET = typer.Option(
    None,
    "--open-set",
    help="This device's labelled training images: an image unlike them is scored, without the label "
    "prior, by the fleet's adapter delivered with the one in use, else the bundle's own model "
    "(docs/inference.md, 'Open-set gate').",
)
OPEN_SET_Q = typer.Option(
    0.05, "--open-set-quantile", help="Share of the device's own images the gate may send away."
)
OPEN_SET_FALLBACK = typer.Option(
    None,
    "--open-set-fallback",
    help="With --adapter: the adapter the gate sends unfamiliar images to (the fleet's global one); "
    "default the bundle's own model. An agent's state dir brings its own.",
)
CACHE = typer.Option(
    None,
    "--cache-dir",
    help="Image-embedding cache for text-tower bundles (default: ~/.cache/fedclip/embeddings).",
)
