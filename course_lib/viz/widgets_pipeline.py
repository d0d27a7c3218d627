"""Chapter 5's explorer: pick a schedule, p, m, v and the costs; see its Gantt chart.

:func:`pipeline_explorer` is built like chapter 3's ``zero_memory_explorer``: ipywidgets
controls, an HTML line of numbers and the figure as PNG bytes in an ``Image`` (no output
area to replay), returned as an :class:`~course_lib.viz.widgets.Explorer` whose
``children`` a test can drive without a browser. An invalid combination (1F1B with
m < p, interleaving with m not a multiple of p, ...) shows the library's ``ValueError``
message instead of a figure. The book has no kernel: its static twin is
:func:`course_lib.viz.plots_pipeline.plot_schedule_grid`.
"""

from __future__ import annotations

import html
import io

import ipywidgets as w

from course_lib.parallel.pipeline_sim import Simulation, simulate
from course_lib.parallel.schedules import (
    Schedule,
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    zero_bubble_h1,
)
from course_lib.viz.plots_pipeline import plot_gantt
from course_lib.viz.widgets import Explorer

SCHEDULE_NAMES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved": "interleaved", "zb": "ZB-H1"}


def build_schedule(name: str, stages: int, microbatches: int, chunks: int = 1) -> Schedule:
    """Chapter 5: the schedule called ``name`` (a key of ``SCHEDULE_NAMES``) for p, m, v.

    ``chunks`` is used only by ``"interleaved"``; the library's ``ValueError`` for a bad
    combination passes through unchanged.
    """
    if name == "gpipe":
        return gpipe(stages, microbatches)
    if name == "1f1b":
        return one_f_one_b(stages, microbatches)
    if name == "interleaved":
        return interleaved_1f1b(stages, microbatches, chunks)
    if name == "zb":
        return zero_bubble_h1(stages, microbatches)
    raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULE_NAMES)}")


def summary(sim: Simulation, chunks: int = 1) -> str:
    """Chapter 5: the explorer's line: bubble, makespan and peak activations per rank."""
    peaks = ", ".join(str(n) for n in sim.peak_activations)
    unit = f" (micro-batch x chunk pairs, each 1/{chunks} of a micro-batch)" if chunks > 1 else ""
    return (
        f"<b>bubble {sim.bubble_fraction:.1%}</b>, makespan {sim.makespan:.4g} (simulated "
        f"units), peak activations per rank [{peaks}]{unit}"
    )


def pipeline_explorer(
    schedule: str = "1f1b",
    stages: int = 4,
    microbatches: int = 8,
    chunks: int = 2,
    t_f: float = 1.0,
    t_b: float = 1.0,
    t_w: float = 1.0,
    t_comm: float = 0.0,
) -> Explorer:
    """Chapter 5: controls schedule x p x m x v x costs -> Gantt chart, bubble, peaks.

    Children, in order: schedule, p, m, v, t_f, t_b, t_w, t_comm, the HTML text, the PNG
    image. ``t_b`` is the input-gradient half of the backward and ``t_w`` the weight-
    gradient half; schedules without ``W`` run both in ``B`` (as ``simulate`` does).
    """
    pick = w.ToggleButtons(options=[(v, k) for k, v in SCHEDULE_NAMES.items()], value=schedule)
    p = w.IntSlider(value=stages, min=1, max=8, description="p (ranks)")
    m = w.IntSlider(value=microbatches, min=1, max=32, description="m (micro)")
    v = w.IntSlider(value=chunks, min=1, max=4, description="v (chunks)")
    named = (("t_F", t_f), ("t_B", t_b), ("t_W", t_w), ("t_comm", t_comm))
    costs = [w.FloatSlider(value=x, min=0.0, max=4.0, step=0.1, description=n) for n, x in named]
    text, plot = w.HTML(), w.Image(format="png")

    def update(*_: object) -> None:
        v.disabled = pick.value != "interleaved"
        n_chunks = v.value if pick.value == "interleaved" else 1
        try:
            sched = build_schedule(pick.value, p.value, m.value, n_chunks)
            sim = simulate(sched, *(c.value for c in costs), chunks=n_chunks)
        except ValueError as error:
            text.value = f"<b>not a valid pipeline:</b> {html.escape(str(error))}"
            plot.value = b""
            return
        text.value = summary(sim, n_chunks)
        name = SCHEDULE_NAMES[pick.value]
        title = f"{name}, p={p.value}, m={m.value}" + (f", v={n_chunks}" if n_chunks > 1 else "")
        fig = plot_gantt(sim, title=title, chunks=n_chunks, bubble=sim.bubble_fraction)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=80)
        plot.value = png.getvalue()

    for control in (pick, p, m, v, *costs):
        control.observe(update, names="value")
    update()
    return Explorer([pick, p, m, v, *costs, text, plot], "pipeline schedule explorer")
