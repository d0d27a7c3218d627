"""Matplotlib figures for the notebooks and the command line.

Figures are built on :class:`matplotlib.figure.Figure` directly, never through pyplot:
no GUI backend is needed (the CLI runs headless, rendering with Agg) and no global
state changes. In a notebook a returned Figure displays inline; or pass ``ax`` to draw
into axes of your own.

Every figure of the course takes its colours from one palette, :data:`PALETTE` (named
roles: params / grads / optimizer / activations, measured / predicted, ours / torch, one
per strategy) and :data:`SEQUENCE` (the i-th series without a role). They live in
:mod:`course_lib.viz.palette`, which imports no matplotlib, so that chapter modules the
spawned ranks import can use them too; they are re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from course_lib.viz.palette import PALETTE, SEQUENCE, color

__all__ = ["PALETTE", "SEQUENCE", "color", "plot_loss", "save_loss_plot"]


def _trailing_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    lo = np.maximum(np.arange(1, len(values) + 1) - window, 0)
    return (sums[1:] - sums[lo]) / (np.arange(1, len(values) + 1) - lo)


def plot_loss(
    metrics: Sequence[dict[str, Any]],
    unigram_bits: float | None = None,
    ax: Axes | None = None,
    title: str = "GPT on bytes: loss",
) -> Figure:
    """Training and validation loss against step, in nats per byte (chapter 0).

    ``metrics`` are :func:`course_lib.train.train`'s rows. The training loss is drawn
    raw (faint) and as a trailing mean; ``unigram_bits`` (from
    :func:`course_lib.data.unigram_entropy_bits`) is drawn as a horizontal line: a
    model that learned anything about context ends below it. The right axis reads bits.
    """
    if ax is None:
        ax = Figure(figsize=(7, 4.2), layout="constrained").subplots()
    steps = np.array([m["step"] for m in metrics])
    loss = np.array([m["loss"] for m in metrics], dtype=float)
    train = PALETTE["train"]
    ax.plot(steps, loss, color=train, alpha=0.25, lw=0.8)
    ax.plot(steps, _trailing_mean(loss, max(1, len(loss) // 50)), color=train, label="train")
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", color=PALETTE["validation"], label="validation")
    if unigram_bits is not None:
        label = f"unigram entropy ({unigram_bits:.2f} bits/byte)"
        ax.axhline(unigram_bits * math.log(2), color=PALETTE["reference"], ls="--", label=label)
    bits = ax.secondary_yaxis(
        "right", functions=(lambda n: n / math.log(2), lambda b: b * math.log(2))
    )
    bits.set_ylabel("bits/byte")
    ax.set(xlabel="step", ylabel="loss (nats/byte)", title=title)
    ax.legend()
    return ax.figure


def save_loss_plot(
    metrics: Sequence[dict[str, Any]], path: str | Path, unigram_bits: float | None = None
) -> Path:
    """Draw :func:`plot_loss` into a PNG file at ``path`` (chapter 0); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot_loss(metrics, unigram_bits).savefig(path, dpi=120)
    return path
