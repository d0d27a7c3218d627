"""Chapter 3's ZeRO-3 timeline: when each unit's all-gathers, compute and reduce-scatters ran.

A timeline is what :class:`course_lib.parallel.fsdp.Timeline` records: events
``(unit, kind, start, end)`` (``TimelineEvent`` objects, or plain tuples as spawned ranks
send them back), with kind one of ``all-gather``, ``forward``, ``backward``,
``reduce-scatter``. Each panel has one row per stream: compute (forward, backward), the
all-gathers, the reduce-scatters. Without prefetch the rows take turns; with prefetch the
next unit's all-gather sits under the current unit's compute. As in
:mod:`course_lib.viz.plots`, figures are built on :class:`~matplotlib.figure.Figure`
directly (no pyplot) and every function returns its Figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from course_lib.viz.palette import PALETTE

STREAMS = ("compute", "all-gather", "reduce-scatter")  # one row each, top to bottom
KIND_STREAM = {"forward": "compute", "backward": "compute",
               "all-gather": "all-gather", "reduce-scatter": "reduce-scatter"}  # fmt: skip
KIND_COLOUR = {"forward": PALETTE["F"], "backward": PALETTE["B"],  # communication: purple, red
               "all-gather": PALETTE["comm_intra"],
               "reduce-scatter": PALETTE["comm_inter"]}  # fmt: skip
Event = tuple[str, str, float, float]  # (unit, kind, start, end), seconds


def timeline_events(timeline: Any) -> list[Event]:
    """Chapter 3: a ``Timeline``, its ``.events``, or tuples, as ``(unit, kind, start, end)``.

    Times are shifted so that the first event starts at 0.
    """
    raw = getattr(timeline, "events", timeline)
    events = [(e.unit, e.kind, e.start, e.end) if hasattr(e, "kind") else tuple(e) for e in raw]
    for _, kind, _, _ in events:
        if kind not in KIND_STREAM:
            raise ValueError(f"unknown event kind {kind!r}; expected one of {list(KIND_STREAM)}")
    t0 = min((e[2] for e in events), default=0.0)
    return [(u, k, s - t0, e - t0) for u, k, s, e in events]


def _short(unit: str) -> str:
    """The label drawn inside a box: "block 3" -> "3", "root" -> "r"."""
    return unit.split()[-1] if unit.startswith(("block", "unit")) else unit[:1]


def _draw(ax: Axes, events: Sequence[Event], scale: float, span: float) -> None:
    """One box per event on its stream's row; labelled when wide enough to read."""
    for unit, kind, start, end in events:
        row = STREAMS.index(KIND_STREAM[kind])
        width = (end - start) * scale
        ax.broken_barh([(start * scale, width)], (row - 0.4, 0.8), facecolors=KIND_COLOUR[kind],
                       edgecolor="white", linewidth=0.6)  # fmt: skip
        if width > 0.015 * span:
            ax.text(start * scale + width / 2, row, _short(unit), ha="center", va="center",
                    fontsize=9, color="white", clip_on=True)  # fmt: skip
    ax.set_yticks(range(len(STREAMS)), STREAMS)
    ax.set_ylim(len(STREAMS) - 0.5, -0.5)  # compute on top
    ax.grid(axis="x", alpha=0.3)


def plot_prefetch_timeline(
    timelines: Mapping[str, Any], title: str | None = None, unit: str = "ms"
) -> Figure:
    """Chapter 3: one panel per timeline (e.g. ``{"no prefetch": t0, "prefetch": t1}``).

    Every panel shares one time axis (``unit``: "ms" or "s"), so the shorter step shows
    as a shorter row of boxes; each panel's title gives its span (first start to last
    end: forward, backward and gradient communication, without the optimizer step).
    Labels inside the boxes are the block numbers ("r": the root).
    """
    if not timelines:
        raise ValueError("timelines is empty: pass {label: Timeline or its events}")
    if unit not in ("ms", "s"):
        raise ValueError(f"unit={unit!r}: choose 'ms' or 's'")
    scale = 1e3 if unit == "ms" else 1.0
    fig = Figure(figsize=(10, 1.5 * len(timelines) + 1.2), layout="constrained")
    axes = fig.subplots(len(timelines), 1, sharex=True, squeeze=False)[:, 0]
    panels = {label: timeline_events(t) for label, t in timelines.items()}
    longest = max((e[3] for events in panels.values() for e in events), default=0.0) * scale
    for ax, (label, events) in zip(axes, panels.items(), strict=True):
        span = max((e[3] for e in events), default=0.0) * scale
        _draw(ax, events, scale, longest)
        ax.set_title(
            f"{label}: {span:.3g} {unit} from first to last event", fontsize=10, loc="left"
        )
    axes[-1].set_xlabel(f"time since the step began ({unit})")
    handles = [Patch(color=c, label=k) for k, c in KIND_COLOUR.items()]
    fig.legend(handles=handles, loc="outside upper right", ncols=4, fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, x=0.01, ha="left")
    return fig
