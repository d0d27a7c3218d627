"""Chapter 7's figures: the DP x PP x TP grid, bytes per axis, the planner's ranked plans.

:func:`grid_figure` draws the ranks of a grid three times, once per axis, each rank
coloured by the group it belongs to on that axis (the groups come from the library's
``Topology``, through :func:`course_lib.chapters.ch07_3d.grid_groups`).
:func:`traffic_figure` plots seconds per step of each axis on the intra-node and on the
inter-node link (:func:`course_lib.chapters.ch07_3d.axis_traffic`). :func:`plan_figure`
draws the planner's best configurations as memory and time bars (the static twin of
:func:`course_lib.viz.widgets_planner.planner_explorer`), :func:`measured_figure` a
measured quantity beside its prediction, one bar pair per configuration.

As in :mod:`course_lib.viz.plots_tensor`, every function builds a
:class:`~matplotlib.figure.Figure` directly (no pyplot) and returns it; legends sit
outside the data; no text is smaller than 10 points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import FancyBboxPatch, Patch

from course_lib.viz.palette import PALETTE, color

_FONT = 10  # the smallest font size of the course's figures, in points
GIB = 2**30
AXIS_TITLES = {
    "tp": "tp groups: neighbours (one node's fast link)",
    "pp": "pp groups: the stages of one replica",
    "dp": "dp groups: the same piece in every replica",
}
MEMORY_KINDS = ("params", "grads", "optimizer", "zero3_buffers", "activations")
TIME_KINDS = ("compute", "tp", "pp_p2p", "bubble", "dp_exposed")
TIME_COLOURS = {  # none of them a memory kind's colour: both panels share one figure
    "compute": PALETTE["reference"],
    "tp": PALETTE["tp"],
    "pp_p2p": PALETTE["pp"],
    "bubble": "#dddddd",
    "dp_exposed": color(6),
}
TIME_LABELS = {
    "compute": "compute",
    "tp": "tp collectives",
    "pp_p2p": "pp sends",
    "bubble": "pipeline bubble",
    "dp_exposed": "dp all-reduce (exposed)",
}

# ---------------------------------------------------------------------------------------
# 1. The grid
# ---------------------------------------------------------------------------------------


def _check_grid(grid: Mapping[str, Any]) -> tuple[int, int, int]:
    missing = [k for k in ("coords", "dp", "pp", "tp") if k not in grid]
    if missing:
        raise ValueError(f"grid_figure needs ch07_3d.grid_groups' result; it lacks {missing}")
    coords = list(grid["coords"].values())
    return tuple(1 + max(c[i] for c in coords) for i in range(3))  # type: ignore[return-value]


def _rank_xy(d: int, p: int, t: int, tp: int) -> tuple[float, float]:
    """Where rank (d, p, t) sits: stages left to right (a gap between them), replicas down."""
    return p * (tp + 0.6) + t, -d * 1.4


def _grid_panel(ax, grid: Mapping[str, Any], axis: str, tp: int) -> None:
    groups = {r: i for i, g in enumerate(grid[axis]) for r in g}  # rank -> its group's index
    for rank, (d, p, t) in grid["coords"].items():
        x, y = _rank_xy(d, p, t, tp)
        box = FancyBboxPatch(
            (x - 0.42, y - 0.5),
            0.84,
            1.0,
            boxstyle="round,pad=0.02",
            facecolor=color(groups[rank]),
            alpha=0.85,
            edgecolor="black",
        )
        ax.add_patch(box).set_gid("rank")
        ax.text(
            x,
            y + 0.15,
            str(rank),
            ha="center",
            va="center",
            fontsize=13,
            weight="bold",
            color="white",
        )
        ax.text(
            x, y - 0.25, f"{d},{p},{t}", ha="center", va="center", fontsize=_FONT, color="white"
        )
    lines = [f"{i}: ranks {', '.join(map(str, g))}" for i, g in enumerate(grid[axis])]
    ax.set_title(AXIS_TITLES[axis], fontsize=11)
    ax.text(
        0.5, -0.02, "\n".join(lines), transform=ax.transAxes, ha="center", va="top", fontsize=_FONT
    )


def grid_figure(grid: Mapping[str, Any], *, title: str | None = None) -> Figure:
    """Chapter 7: the ranks of a dp x pp x tp grid, coloured by their tp, pp and dp groups.

    ``grid`` is :func:`course_lib.chapters.ch07_3d.grid_groups`' result. Each panel shows
    every rank as a box (global rank on top, its (dp, pp, tp) coordinates below): the
    pipeline stages left to right with a gap between them, the data-parallel replicas
    one under the other. A panel colours the boxes by group on its axis and lists the
    groups under it.
    """
    dp, pp, tp = _check_grid(grid)
    fig = Figure(figsize=(4.4 * 3, 2.2 + 1.5 * dp), layout="constrained")
    for ax, axis in zip(fig.subplots(1, 3), ("tp", "pp", "dp"), strict=True):
        _grid_panel(ax, grid, axis, tp)
        right, _ = _rank_xy(0, pp - 1, tp - 1, tp)
        ax.set_xlim(-0.7, right + 0.7)
        ax.set_ylim(-(dp - 1) * 1.4 - 0.8, 0.8)
        ax.set_aspect("equal")
        ax.axis("off")
        for p in range(pp):  # name the stages above the first replica
            x = (_rank_xy(0, p, 0, tp)[0] + _rank_xy(0, p, tp - 1, tp)[0]) / 2
            ax.text(x, 0.6, f"stage {p}", ha="center", va="bottom", fontsize=_FONT)
    fig.suptitle(
        title
        or f"dp={dp} x pp={pp} x tp={tp}: rank = (d·pp + p)·tp + t, labelled 'rank' over 'd,p,t'",
        fontsize=12,
    )
    return fig


# ---------------------------------------------------------------------------------------
# 2. Bytes and seconds per axis
# ---------------------------------------------------------------------------------------


def traffic_figure(rows: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """Chapter 7: seconds per step of each axis on the intra- and the inter-node link.

    ``rows`` are :func:`course_lib.chapters.ch07_3d.axis_traffic`'s. Two bars per axis
    (log scale), the GB each GPU sends above them, and the slowest stage's compute time
    per step as a dashed line. Modelled (alpha-beta), not measured.
    """
    axes = [r for r in rows if r["axis"] != "compute"]
    compute = [r for r in rows if r["axis"] == "compute"]
    if not axes or not compute:
        raise ValueError("traffic_figure needs ch07_3d.axis_traffic's rows (axes and compute)")
    fig = Figure(figsize=(8.5, 5), layout="constrained")
    ax = fig.subplots()
    xs = np.arange(len(axes))
    for k, (key, colour) in enumerate(
        (("intra_s", PALETTE["comm_intra"]), ("inter_s", PALETTE["comm_inter"]))
    ):
        values = [max(r[key], 1e-6) for r in axes]
        link = axes[0]["intra_link" if key == "intra_s" else "inter_link"]
        ax.bar(xs + (k - 0.5) * 0.38, values, 0.36, color=colour, label=f"on {link}")
        for x, v in zip(xs + (k - 0.5) * 0.38, values, strict=True):
            ax.text(x, v * 1.1, f"{v:.3g} s", ha="center", va="bottom", fontsize=_FONT)
    ax.axhline(
        compute[0]["intra_s"],
        color=PALETTE["compute"],
        ls="--",
        label=f"compute per step ({compute[0]['intra_s']:.2f} s)",
    )
    ax.set_yscale("log")
    ax.set_ylim(top=max(r["inter_s"] for r in axes) * 8)
    ax.set_xticks(
        xs, [f"{r['axis']} = {r['size']}\n{r['bytes'] / 1e9:.2f} GB sent per GPU" for r in axes]
    )
    ax.set_ylabel("seconds per training step (log scale)")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(loc="outside lower center", ncol=3, frameon=False, fontsize=_FONT)
    ax.set_title(
        title or "Each axis's communication per step, on either link (modelled)", fontsize=12
    )
    return fig


# ---------------------------------------------------------------------------------------
# 3. The planner's plans: memory and time
# ---------------------------------------------------------------------------------------


def _stacked(
    ax,
    labels: list[str],
    parts: list[dict[str, float]],
    kinds: Sequence[str],
    colours: Mapping[str, str],
    names: Mapping[str, str],
    scale: float,
) -> None:
    ys = np.arange(len(labels))[::-1]
    left = np.zeros(len(labels))
    for kind in kinds:
        values = np.array([p.get(kind, 0.0) for p in parts]) / scale
        if values.any():
            ax.barh(ys, values, left=left, color=colours[kind], label=names[kind])
        left += values
    ax.set_yticks(ys, labels, fontsize=_FONT)
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def plan_figure(
    plans: Sequence[Any], memory_bytes: float | None = None, *, title: str | None = None
) -> Figure:
    """Chapter 7: the planner's configurations, fastest at the top: memory and time bars.

    ``plans`` are :class:`course_lib.cost.planner.Plan` objects (``PlanTable.plans[:n]``).
    Left: GiB per GPU of the busiest stage by kind, with the GPU's memory dashed. Right:
    the predicted step by part (compute, tp collectives, pp sends, bubble, the exposed dp
    all-reduce).
    """
    if not plans:
        raise ValueError("plan_figure needs at least one Plan (planner.plan(...).plans[:n])")
    labels = [p.choice.label() for p in plans]
    fig = Figure(figsize=(12, 1.2 + 0.42 * len(plans)), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    names = {k: k.replace("zero3_buffers", "ZeRO-3 buffers") for k in MEMORY_KINDS}
    mem_colours = {**PALETTE, "zero3_buffers": PALETTE["zero3"]}
    _stacked(left, labels, [p.memory for p in plans], MEMORY_KINDS, mem_colours, names, GIB)
    if memory_bytes:
        left.axvline(
            memory_bytes / GIB,
            color=PALETTE["device"],
            ls="--",
            label=f"GPU memory ({memory_bytes / GIB:.0f} GiB)",
        )
    left.set_xlabel("GiB per GPU (busiest stage)")
    _stacked(right, labels, [p.time for p in plans], TIME_KINDS, TIME_COLOURS, TIME_LABELS, 1.0)
    right.set_xlabel("predicted seconds per step")
    for ax in (left, right):
        ax.legend(
            loc="upper center",
            bbox_to_anchor=(0.5, -0.12 - 0.6 / len(plans)),
            ncol=3,
            frameon=False,
            fontsize=_FONT,
        )
    fig.suptitle(title or "The planner's ranking, fastest first", fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------
# 4. Measured beside predicted
# ---------------------------------------------------------------------------------------


def measured_figure(
    labels: Sequence[str],
    measured: Sequence[float],
    predicted: Sequence[float],
    *,
    ylabel: str,
    title: str | None = None,
) -> Figure:
    """Chapter 7: one measured bar and one predicted outline per configuration, with the ratio."""
    if not labels or not len(labels) == len(measured) == len(predicted):
        raise ValueError(
            f"measured_figure needs as many labels, measured and predicted values, got "
            f"{len(labels)}, {len(measured)}, {len(predicted)}"
        )
    fig = Figure(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.8), layout="constrained")
    ax = fig.subplots()
    xs = np.arange(len(labels))
    ax.bar(xs - 0.19, measured, 0.36, color=PALETTE["measured"], label="measured")
    ax.bar(
        xs + 0.19,
        predicted,
        0.36,
        color="white",
        edgecolor=PALETTE["predicted"],
        hatch="//",
        label="predicted",
    )
    for x, m, p in zip(xs, measured, predicted, strict=True):
        ratio = f"{m / p:.2f}x" if p else "-"
        ax.text(x, max(m, p) * 1.02, ratio, ha="center", va="bottom", fontsize=_FONT)
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=_FONT)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.18 * max(max(measured), max(predicted)))
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.legend(
        handles=[
            Patch(color=PALETTE["measured"], label="measured"),
            Patch(facecolor="white", edgecolor="black", hatch="//", label="predicted"),
        ],
        loc="outside lower center",
        ncol=2,
        frameon=False,
        fontsize=_FONT,
    )
    ax.set_title(title or "Measured vs predicted (ratio measured / predicted on top)", fontsize=12)
    return fig
