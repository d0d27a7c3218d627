"""Chapter 5's figures: pipeline schedules as Gantt charts, and the bubble against m.

A Gantt chart has one row per rank (rank 0 on top) and one box per action, from its start
to its end, coloured by op (``PALETTE["F"]``, ``["B"]``, ``["W"]``); with interleaving,
chunk ``c`` of ``v`` is a lighter shade of its op's colour. A rank's idle time is its
row's pale background (``PALETTE["idle"]``): the bubble is what you see of it.

A timeline is, per rank, a list of actions with their start and end, in any of the forms
the chapter meets: a ``Simulation`` (or its ``.timeline``: ``(Action, start, end)``),
``PipelineParallel.records`` (``Record(action, start, end)``), or the measured tuples
``(str(action), start, end)`` that spawned ranks send back. As in
:mod:`course_lib.viz.plots`, figures are built on :class:`~matplotlib.figure.Figure`
directly (no pyplot) and every function returns its Figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from course_lib.parallel.pipeline_sim import simulate
from course_lib.parallel.schedules import OPS, Action, Schedule
from course_lib.viz.palette import PALETTE

Rows = list[list[tuple[Action, float, float]]]  # per rank: (action, start, end)
_MARKERS = ("o", "s", "^", "D", "v", "P")  # one per schedule in the bubble figure


def gantt_rows(timeline: Any) -> tuple[Rows, bool]:
    """Chapter 5: any timeline as ``(action, start, end)`` rows, and whether it was measured.

    Accepts a ``Simulation``, its ``.timeline``, per-rank ``Record`` lists, or per-rank
    ``(str(action), start, end)`` tuples. Measured: records or strings (the simulator
    yields ``Action`` objects), so the time axis is in seconds.
    """
    timeline = getattr(timeline, "timeline", timeline)
    rows: Rows = []
    measured = False
    for items in timeline:
        row = []
        for item in items:
            if hasattr(item, "action"):  # a Record
                item, measured = (item.action, item.start, item.end), True
            action, start, end = item
            if isinstance(action, str):
                action, measured = Action.parse(action), True
            row.append((action, float(start), float(end)))
        rows.append(row)
    return rows, measured


def timeline_bubble(timeline: Any) -> float:
    """Chapter 5: the idle share of rank-time, ``1 - busy / (p * makespan)``, from time 0."""
    rows, _ = gantt_rows(timeline)
    makespan = _makespan(rows)
    busy = sum(e - s for row in rows for _, s, e in row)
    return 1 - busy / (len(rows) * makespan) if makespan else 0.0


def _makespan(rows: Rows) -> float:
    return max((e for row in rows for _, _, e in row), default=0.0)


def _chunks(rows: Rows, chunks: int) -> int:
    return max(chunks, 1 + max((a.chunk for row in rows for a, _, _ in row), default=0))


def _shade(op: str, chunk: int, chunks: int) -> tuple[float, float, float]:
    """The op's colour, mixed with white by up to 55% for later chunks."""
    mix = 0.55 * chunk / (chunks - 1) if chunks > 1 else 0.0
    return tuple(c + (1 - c) * mix for c in to_rgb(PALETTE[op]))  # type: ignore[return-value]


def _ink(rgb: tuple[float, float, float]) -> str:
    """White text on dark boxes, black on light ones (relative luminance)."""
    return "white" if 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2] < 0.55 else "black"


def _draw(ax: Axes, rows: Rows, chunks: int, scale: float = 1.0) -> None:
    """Idle background, then one Rectangle per action (gid "action"), labelled if wide."""
    makespan, chunks = _makespan(rows) * scale, _chunks(rows, chunks)
    points = ax.get_position().width * ax.figure.get_figwidth() * 72  # axes width, pt
    for rank, row in enumerate(rows):
        idle = Rectangle((0, rank - 0.4), makespan, 0.8, color=PALETTE["idle"], zorder=0)
        ax.add_patch(idle).set_gid("idle")
        for action, start, end in row:
            rgb = _shade(action.op, action.chunk, chunks)
            width = (end - start) * scale
            box = Rectangle((start * scale, rank - 0.4), width, 0.8, facecolor=rgb,
                            edgecolor="white", linewidth=0.5, zorder=2)  # fmt: skip
            ax.add_patch(box).set_gid("action")
            text = str(action.microbatch)
            if makespan and width / makespan * points >= 5 * len(text) + 3:
                ax.text((start + end) / 2 * scale, rank, text, ha="center", va="center",
                        fontsize=7, color=_ink(rgb), zorder=3)  # fmt: skip
    ax.set_xlim(0, makespan * 1.01 or 1)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # rank 0 on top
    ax.set_yticks(range(len(rows)), [f"rank {r}" for r in range(len(rows))])
    ax.grid(axis="x", alpha=0.3)
    ax.set_axisbelow(True)


def _legend(ax: Axes, rows: Rows, chunks: int) -> None:
    ops = {a.op for row in rows for a, _, _ in row}
    chunks = _chunks(rows, chunks)
    names = {"F": "F forward", "B": "B backward", "W": "W weight grad"}
    if "W" in ops:
        names["B"] = "B input grad"
    handles = [Patch(color=PALETTE[op], label=names[op]) for op in OPS if op in ops]
    for c in range(1, chunks):
        handles.append(Patch(color=_shade("F", c, chunks), label=f"chunk {c} (lighter)"))
    handles.append(Patch(color=PALETTE["idle"], label="idle"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.005, 1), fontsize=8,
              frameon=False)  # fmt: skip


def _corner(ax: Axes, bubble: float) -> None:
    """The bubble above the axes' top-right corner (never over the boxes)."""
    ax.set_title(f"bubble {bubble:.1%}", loc="right", fontsize=9)


def plot_gantt(
    timeline: Any,
    ax: Axes | None = None,
    title: str | None = None,
    chunks: int = 1,
    *,
    bubble: float | None = None,
    unit: str | None = None,
) -> Figure:
    """Chapter 5: a Gantt chart of one pipeline step: a row per rank, a box per action.

    ``timeline`` is any form :func:`gantt_rows` reads. ``bubble`` (a fraction) is written
    above the top-right corner; ``unit`` labels the x axis (default: seconds for measured
    timelines, simulated units otherwise). ``chunks`` is inferred when larger.
    """
    rows, measured = gantt_rows(timeline)
    if ax is None:
        ax = Figure(figsize=(10, 0.45 * len(rows) + 1.3), layout="constrained").subplots()
    _draw(ax, rows, chunks)
    _legend(ax, rows, chunks)
    ax.set_xlabel(f"time ({unit or ('seconds' if measured else 'simulated units')})")
    if bubble is not None:
        _corner(ax, bubble)
    if title:
        ax.set_title(title, loc="left")
    return ax.figure


def plot_gantt_pair(
    simulated: Any,
    measured: Any,
    *,
    chunks: int = 1,
    title: str | None = None,
    bubble_simulated: float | None = None,
    bubble_measured: float | None = None,
) -> Figure:
    """Chapter 5: the simulated schedule above the measured timeline of the real run.

    Both x axes are the fraction of each one's own makespan (the makespans are in each
    panel's title), so the shapes compare directly whatever the units. Bubbles default to
    the Simulation's own and to :func:`timeline_bubble` of the measured run.
    """
    (sim_rows, _), (real_rows, _) = gantt_rows(simulated), gantt_rows(measured)
    if bubble_simulated is None:
        bubble_simulated = getattr(simulated, "bubble_fraction", None)
    height = 0.45 * (len(sim_rows) + len(real_rows)) + 2.2
    fig = Figure(figsize=(10, height), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    panels = ((top, sim_rows, "simulated", "units", bubble_simulated),
              (bottom, real_rows, "measured", "s", bubble_measured))  # fmt: skip
    for ax, rows, kind, unit, bubble in panels:
        makespan = _makespan(rows)
        _draw(ax, rows, chunks, 1 / makespan if makespan else 1.0)
        ax.set_title(f"{kind}: makespan {makespan:.3g} {unit}", fontsize=10, loc="left")
        _corner(ax, timeline_bubble(rows) if bubble is None else bubble)
    _legend(top, sim_rows + real_rows, chunks)
    bottom.set_xlabel("time / makespan (each panel on its own clock)")
    if title:
        fig.suptitle(title)
    return fig


def plot_bubble_vs_microbatches(
    stages: int,
    microbatches: Sequence[int],
    simulated: Mapping[str, Sequence[float]] | None = None,
    measured: Mapping[str, Sequence[float]] | None = None,
    *,
    interleaved: Sequence[int] = (),
    ax: Axes | None = None,
    title: str | None = None,
) -> Figure:
    """Chapter 5's headline figure: the bubble fraction against m, for p = ``stages``.

    The formula ``(p - 1) / (m + p - 1)`` is the black line (and ``(p - 1) / (v m + p - 1)``
    dotted for each ``v`` in ``interleaved``). ``simulated`` and ``measured`` map a schedule
    name to one bubble per entry of ``microbatches`` (``nan`` where it did not run):
    simulated as hollow black markers, measured filled in ``PALETTE["measured"]``, one
    marker shape per schedule.
    """
    ax = ax or Figure(figsize=(7, 4.5), layout="constrained").subplots()
    ms = np.asarray(microbatches, dtype=float)
    grid = np.linspace(ms.min(), ms.max(), 200)
    p = stages
    ax.plot(grid, (p - 1) / (grid + p - 1), color=PALETTE["predicted"], lw=1.2,
            label=f"(p-1)/(m+p-1), p={p}")  # fmt: skip
    for v in interleaved:
        ax.plot(grid, (p - 1) / (v * grid + p - 1), ":", color=PALETTE["predicted"], lw=1.2,
                label=f"(p-1)/(vm+p-1), v={v}")  # fmt: skip
    names = list(dict.fromkeys([*(simulated or {}), *(measured or {})]))
    for name, marker in zip(names, _MARKERS * 4, strict=False):
        if simulated and name in simulated:
            ax.plot(ms, simulated[name], marker, ls="none", mfc="none", ms=8,
                    color=PALETTE["predicted"], label=f"{name}: simulated")  # fmt: skip
        if measured and name in measured:
            ax.plot(ms, measured[name], marker, ls="none", ms=6, alpha=0.85,
                    color=PALETTE["measured"], label=f"{name}: measured")  # fmt: skip
    ax.set_xlabel("micro-batches m")
    ax.set_ylabel("bubble fraction (idle share of rank-time)")
    ax.set_ylim(0, None)
    ax.set_title(title or f"Pipeline bubble against micro-batches, p = {p}")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ax.figure


def plot_schedule_grid(
    schedules: Mapping[str, Schedule],
    t_f: float,
    t_b: float,
    t_w: float = 0,
    t_comm: float = 0,
    *,
    title: str | None = None,
) -> Figure:
    """Chapter 5: one simulated Gantt chart per schedule, stacked on one x scale.

    Each panel's title gives the bubble and the peak activations per rank, in whole
    micro-batches (with ``v`` chunks a pair counts 1/v). Chunks are read off the schedule.
    The static twin of :func:`course_lib.viz.widgets_pipeline.pipeline_explorer`.
    """
    runs = {}
    for name, schedule in schedules.items():
        chunks = 1 + max(a.chunk for row in schedule for a in row)
        runs[name] = (simulate(schedule, t_f, t_b, t_w, t_comm, chunks=chunks), chunks)
    heights = [len(s) + 1.2 for s in schedules.values()]
    fig = Figure(figsize=(10, 0.45 * sum(heights) + 0.8), layout="constrained")
    axes = fig.subplots(len(runs), 1, sharex=True, squeeze=False, height_ratios=heights)[:, 0]
    for ax, (name, (sim, chunks)) in zip(axes, runs.items(), strict=True):
        _draw(ax, gantt_rows(sim)[0], chunks)
        _legend(ax, gantt_rows(sim)[0], chunks)
        peaks = ", ".join(f"{n / chunks:g}" for n in sim.peak_activations)
        ax.set_title(f"{name}: bubble {sim.bubble_fraction:.1%}, makespan {sim.makespan:g}, "
                     f"peak activations per rank [{peaks}]", fontsize=9, loc="left")  # fmt: skip
    axes[0].set_xlim(0, 1.01 * max(sim.makespan for sim, _ in runs.values()) or 1)
    axes[-1].set_xlabel("time (simulated units)")
    costs = f"t_F={t_f:g}, t_B={t_b:g}, t_W={t_w:g}, t_comm={t_comm:g}"
    fig.suptitle(title or f"Pipeline schedules, simulated ({costs})")
    return fig
