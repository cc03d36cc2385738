"""Figures the fmnist reports share: a grid of panels, one per run (matplotlib on its Agg backend)."""

from __future__ import annotations

from typing import Any


def panel_grid(n: int, cols: int, width: float, height: float) -> tuple[Any, Any, list]:
    """(pyplot, figure, the first `n` axes) of a grid at most `cols` wide; the unused cells hidden."""
    import matplotlib

    matplotlib.use("Agg")  # reports are written headless (CI, ssh)
    import matplotlib.pyplot as plt

    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])
