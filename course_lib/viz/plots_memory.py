"""Figures for chapter 0: memory and time budgets of training, predicted and measured.

Like :mod:`course_lib.viz.plots`, figures are built on :class:`matplotlib.figure.Figure`
directly, never through pyplot: no GUI backend, no global state. Every function draws
into ``ax`` (new axes when None) and returns the Figure, which a notebook displays
inline. Memory is plotted in binary units, GiB (2**30 bytes) or MiB (2**20 bytes), as
the course counts it everywhere (cost/hardware.py states the convention), and every
axis and label says which; times are in days.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from course_lib.cost.cost_model import GIB, MIB, MemoryBreakdown, format_days
from course_lib.viz.palette import PALETTE, color

_PARTS = ("params", "grads", "optimizer", "activations")  # stacked bottom to top
_GPU_STYLES = ("--", "-.", ":")


def _axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is None:
        ax = Figure(figsize=figsize, layout="constrained").subplots()
    return ax


def _gpu_lines(ax: Axes, device_bytes: Mapping[str, int]) -> None:
    for (name, nbytes), style in zip(device_bytes.items(), _GPU_STYLES * 4, strict=False):
        ax.axhline(
            nbytes / GIB, color=PALETTE["device"], linestyle=style, linewidth=1.2, label=name
        )


def plot_memory_breakdown(
    breakdowns: Mapping[str, MemoryBreakdown],
    device_bytes: Mapping[str, int] | None = None,
    *,
    title: str = "Memory to train one replica with AdamW",
    ax: Axes | None = None,
) -> Figure:
    """Stacked bars of params / grads / optimizer / activations (GiB), one per model.

    Chapter 0's opening figure; ``device_bytes`` draws a horizontal line per GPU.
    """
    ax = _axes(ax, (7.5, 4.5))
    names = list(breakdowns)
    xs = np.arange(len(names))
    bottom = np.zeros(len(names))
    for part in _PARTS:
        heights = np.array([getattr(breakdowns[n], part) / GIB for n in names])
        if not heights.any():
            continue
        ax.bar(xs, heights, bottom=bottom, color=PALETTE[part], label=part, width=0.6)
        bottom += heights
    for x, top in zip(xs, bottom, strict=True):
        ax.text(x, top, f"{top:,.0f} GiB", ha="center", va="bottom", fontsize=9)
    _gpu_lines(ax, device_bytes or {})
    ax.set_xticks(xs, names)
    ax.set_ylabel("memory (GiB)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return ax.figure


def plot_memory_vs_params(
    models: Sequence[tuple[str, int, int, int]],
    device_bytes: Mapping[str, int],
    *,
    bytes_per_param: int = 16,
    title: str = "Where training stops fitting on one GPU",
    ax: Axes | None = None,
) -> Figure:
    """Log-log memory against parameter count, with a line per GPU (chapter 0).

    ``models`` holds ``(name, n_params, state_bytes, state_plus_activation_bytes)``;
    the ``bytes_per_param * N`` line is drawn across their range.
    """
    ax = _axes(ax, (7.5, 5))
    n = np.array([m[1] for m in models], dtype=float)
    grid = np.logspace(np.log10(n.min() / 3), np.log10(n.max() * 3), 100)
    ax.loglog(
        grid,
        bytes_per_param * grid / GIB,
        color=PALETTE["predicted"],
        linewidth=1,
        label=f"{bytes_per_param} bytes/param (params + grads + AdamW)",
    )
    states = np.array([m[2] for m in models], dtype=float) / GIB
    with_act = np.array([m[3] for m in models], dtype=float) / GIB
    # model states are mostly optimizer state (8 or 12 of 16 bytes): its colour
    ax.loglog(n, states, "o", color=PALETTE["optimizer"], label="model states")
    ax.loglog(
        n,
        with_act,
        "^",
        color=PALETTE["activations"],
        label="+ activations (micro-batch 1, full context)",
    )
    for (name, *_), x, y in zip(models, n, with_act, strict=True):
        ax.annotate(
            name, (x, y), textcoords="offset points", xytext=(-4, 7), fontsize=8, ha="right"
        )
    _gpu_lines(ax, device_bytes)
    ax.set_xlabel("parameters N")
    ax.set_ylabel("memory (GiB)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(which="major", alpha=0.3)
    return ax.figure


def _slope_guides(ax: Axes, xs: Sequence[float], y_end: float, exponents: Sequence[int]) -> None:
    """Lines ``y ∝ x**k``, one per exponent k, over the right half of ``xs``, labelled.

    On log-log axes a power law is a straight line whose slope is its exponent. The
    guides end a factor 3 below ``y_end`` (the data's last value), so that they run
    beside the data and the reader compares slopes, not heights.
    """
    x = np.array([xs[len(xs) // 2 - 1] if len(xs) > 2 else xs[0], xs[-1]], dtype=float)
    for k, style in zip(exponents, (":", "--", "-."), strict=False):
        y = y_end / 3 * (x / x[-1]) ** k
        ax.plot(x, y, style, color=PALETTE["guide"], linewidth=1.2)
        power = "T" if k == 1 else f"T^{k}"
        ax.annotate(
            f"slope {k}: $\\propto {power}$",
            (x[0], y[0]),
            textcoords="offset points",
            xytext=(-4, 0),
            ha="right",
            va="center",
            fontsize=9,
            color=PALETTE["guide"],
        )


def _formula_and_measured(
    ax: Axes,
    seq_lens: Sequence[int],
    measured: Mapping[str, Sequence[int]],
    predicted: Mapping[str, Sequence[int]],
) -> None:
    for i, label in enumerate(predicted):
        series = color(i)  # formula and measurement of one label share its colour
        ax.plot(
            seq_lens, np.array(predicted[label]) / MIB, "-", color=series, label=f"{label}: formula"
        )
        if label in measured:
            ax.plot(
                seq_lens,
                np.array(measured[label]) / MIB,
                "o",
                color=series,
                markerfacecolor="none",
                markersize=9,
                label=f"{label}: measured",
            )


def plot_activation_check(
    seq_lens: Sequence[int],
    measured: Mapping[str, Sequence[int]],
    predicted: Mapping[str, Sequence[int]],
    *,
    title: str = "Saved activations: formula (lines) vs autograd (markers)",
    guides: Sequence[int] = (1, 2),
    difference: tuple[str, str] | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Activation bytes (MiB) against sequence length on log-log axes (chapter 0).

    The formula is drawn as lines and the measurement as markers; ``measured`` and
    ``predicted`` map a label (e.g. an attention backend) to one value per entry of
    ``seq_lens``. ``guides`` draws grey lines of those slopes (1: linear, 2: quadratic)
    so that the reader can read each curve's exponent. ``difference=(a, b)`` adds a right
    panel with ``a - b``, measured and predicted: what kernel ``a`` saves on top of ``b``
    (for "math" minus "flash", the T x T attention probabilities alone).
    """
    if difference is not None and ax is not None:
        raise ValueError("difference draws a second panel in a new figure; pass ax=None")
    if difference is None:
        axes = [_axes(ax, (7, 4.5))]
    else:
        axes = list(Figure(figsize=(12, 4.5), layout="constrained").subplots(1, 2))
    left = axes[0]
    _formula_and_measured(left, seq_lens, measured, predicted)
    first = next(iter(predicted.values()))
    _slope_guides(left, seq_lens, first[-1] / MIB, guides)
    left.set_ylabel("bytes saved for backward (MiB)")
    left.set_title(title)
    if difference is not None:
        a, b = difference
        extra_m = {f"{a} − {b}": np.subtract(measured[a], measured[b])}
        extra_p = {f"{a} − {b}": np.subtract(predicted[a], predicted[b])}
        right = axes[1]
        _formula_and_measured(right, seq_lens, extra_m, extra_p)
        _slope_guides(right, seq_lens, extra_p[f"{a} − {b}"][-1] / MIB, guides)
        right.set_ylabel("extra bytes saved (MiB)")
        right.set_title(f"What {a} adds over {b}")
    for axis in axes:
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("sequence length T (tokens)")
        axis.legend(fontsize=9, loc="upper left")
        axis.grid(which="both", alpha=0.3)
    return left.figure


def plot_training_days(
    runs: Sequence[str],
    days: Mapping[str, Sequence[float]],
    *,
    title: str = "Time to train, assuming perfect scaling",
    ax: Axes | None = None,
) -> Figure:
    """Grouped bars of training time in days (log scale), one group per run (chapter 0).

    ``days`` maps a hardware label (e.g. "1 H100") to one time per entry of ``runs``;
    dotted lines mark a day, a month and a year.
    """
    ax = _axes(ax, (8, 4.5))
    xs = np.arange(len(runs))
    width = 0.8 / max(1, len(days))
    for i, (label, values) in enumerate(days.items()):
        pos = xs + (i - (len(days) - 1) / 2) * width
        ax.bar(pos, values, width=width, label=label, color=color(i))
        for x, v in zip(pos, values, strict=True):
            ax.text(x, v * 1.3, format_days(v), ha="center", va="bottom", fontsize=7.5)
    for value, name in ((1, "1 day"), (30, "1 month"), (365, "1 year")):
        ax.axhline(value, color=PALETTE["guide"], linestyle=":", linewidth=1)
        ax.text(
            1.01,
            value,
            name,
            va="center",
            ha="left",
            fontsize=8,
            transform=ax.get_yaxis_transform(),
        )
    ax.set_yscale("log")
    top = max(max(v) for v in days.values())
    ax.set_ylim(top=top * 30)  # room for the labels above the bars
    ax.set_xticks(xs, runs)
    ax.set_ylabel("days (log scale)")
    ax.set_title(title)
    ax.legend(fontsize=9, loc="upper left")
    ax.grid(axis="y", which="major", alpha=0.3)
    return ax.figure
