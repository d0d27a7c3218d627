"""Chapter 5's figures and explorer: a box per action, coloured by op, any timeline kind."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402

from course_lib.parallel.pipeline import Record  # noqa: E402
from course_lib.parallel.pipeline_sim import simulate  # noqa: E402
from course_lib.parallel.schedules import (  # noqa: E402
    gpipe,
    interleaved_1f1b,
    one_f_one_b,
    zero_bubble_h1,
)
from course_lib.viz import plots_pipeline as pp  # noqa: E402
from course_lib.viz.palette import PALETTE  # noqa: E402
from course_lib.viz.widgets_pipeline import build_schedule, pipeline_explorer  # noqa: E402


def _boxes(ax):
    return [p for p in ax.patches if p.get_gid() == "action"]


def _actions(timeline):
    return [a for row in timeline for a, _, _ in row]


def test_palette_has_three_distinct_op_colours_and_idle():
    assert len({PALETTE[op] for op in ("F", "B", "W", "idle")}) == 4


def test_gantt_draws_one_box_per_action_coloured_by_op_rank_0_on_top():
    sim = simulate(zero_bubble_h1(3, 4), 1, 1, 1)
    fig = pp.plot_gantt(sim.timeline, bubble=sim.bubble_fraction)
    ax = fig.axes[0]
    boxes, actions = _boxes(ax), _actions(sim.timeline)
    assert len(boxes) == len(actions) == 3 * 4 * 3
    assert [to_hex(b.get_facecolor()) for b in boxes] == [PALETTE[a.op] for a in actions]
    first = boxes[0]  # rank 0's F0 starts at 0, on the top row
    assert first.get_x() == 0 and first.get_y() < boxes[-1].get_y()
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # inverted: rank 0 on top
    assert f"bubble {sim.bubble_fraction:.1%}" in ax.get_title(loc="right")
    assert ax.get_xlabel() == "time (simulated units)"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["F forward", "B input grad", "W weight grad", "idle"]


def test_gantt_reads_records_and_measured_tuples_alike():
    sim = simulate(one_f_one_b(2, 3), 1, 2)
    records = [[Record(a, s / 10, e / 10) for a, s, e in row] for row in sim.timeline]
    tuples = [[(str(a), s / 10, e / 10) for a, s, e in row] for row in sim.timeline]
    rows = [pp.gantt_rows(x) for x in (sim, records, tuples)]
    assert rows[1] == rows[2] and rows[1][1] and not rows[0][1]  # measured, not simulated
    for timeline in (records, tuples):
        ax = pp.plot_gantt(timeline).axes[0]
        assert len(_boxes(ax)) == 2 * 3 * 2 and ax.get_xlabel() == "time (seconds)"
        spans = [x for b in _boxes(ax) for x in (b.get_x(), b.get_x() + b.get_width())]
        want = [x / 10 for row in sim.timeline for _, s, e in row for x in (s, e)]
        assert spans == pytest.approx(want)
    assert pp.timeline_bubble(records) == pytest.approx(sim.bubble_fraction)


def test_interleaved_chunks_are_lighter_shades_of_their_op():
    sim = simulate(interleaved_1f1b(2, 4, 2), 1, 2, chunks=2)
    ax = pp.plot_gantt(sim).axes[0]
    shades = {(a.op, a.chunk): to_hex(b.get_facecolor())
              for a, b in zip(_actions(sim.timeline), _boxes(ax), strict=True)}  # fmt: skip
    assert shades[("F", 0)] == PALETTE["F"] and shades[("B", 0)] == PALETTE["B"]
    assert len(set(shades.values())) == 4  # each op's chunk 1 differs from its chunk 0
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "chunk 1 (lighter)" in legend


def test_gantt_pair_puts_both_on_a_normalised_clock():
    sim = simulate(gpipe(2, 3), 1, 2)
    measured = [[Record(a, 0.01 * s, 0.01 * e + 0.001) for a, s, e in row] for row in sim.timeline]
    fig = pp.plot_gantt_pair(sim, measured, title="GPipe")
    top, bottom = fig.axes
    for ax in (top, bottom):
        boxes = _boxes(ax)
        assert len(boxes) == 2 * 3 * 2
        assert max(b.get_x() + b.get_width() for b in boxes) == pytest.approx(1)
    assert "simulated" in top.get_title(loc="left") and " s" in bottom.get_title(loc="left")
    assert f"{sim.bubble_fraction:.1%}" in top.get_title(loc="right")
    assert "makespan" in bottom.get_xlabel()


def test_bubble_figure_draws_the_formula_black_and_measured_in_its_colour():
    ms = [2, 4, 8]
    sims = {"GPipe": [simulate(gpipe(2, m), 1, 2).bubble_fraction for m in ms]}
    fig = pp.plot_bubble_vs_microbatches(2, ms, sims, {"GPipe": [0.4, 0.25, 0.12]},
                                         interleaved=[2])  # fmt: skip
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    formula = lines["(p-1)/(m+p-1), p=2"]
    assert to_hex(formula.get_color()) == to_hex(PALETTE["predicted"])
    x, y = formula.get_data()
    assert y[0] == pytest.approx(1 / (x[0] + 1))
    assert list(lines["GPipe: simulated"].get_ydata()) == pytest.approx([1 / (m + 1) for m in ms])
    assert to_hex(lines["GPipe: measured"].get_color()) == PALETTE["measured"]
    assert "(p-1)/(vm+p-1), v=2" in lines


def test_schedule_grid_has_a_panel_per_schedule_on_one_x_scale():
    schedules = {"GPipe": gpipe(2, 4), "1F1B": one_f_one_b(2, 4), "ZB-H1": zero_bubble_h1(2, 4),
                 "interleaved": interleaved_1f1b(2, 4, 2)}  # fmt: skip
    fig = pp.plot_schedule_grid(schedules, 1, 1, 1)
    assert len(fig.axes) == 4
    for ax, (name, schedule) in zip(fig.axes, schedules.items(), strict=True):
        assert len(_boxes(ax)) == sum(len(row) for row in schedule)
        assert ax.get_title(loc="left").startswith(f"{name}: bubble")
        assert "peak activations per rank [" in ax.get_title(loc="left")
    assert len({ax.get_xlim() for ax in fig.axes}) == 1
    peaks = simulate(schedules["interleaved"], 1, 1, 1, chunks=2).peak_activations
    assert peaks == [5, 3]  # (micro-batch, chunk) pairs, each half a micro-batch's layers
    assert "[2.5, 1.5]" in fig.axes[3].get_title(loc="left")


def test_build_schedule_names_and_errors():
    assert build_schedule("zb", 2, 2) == zero_bubble_h1(2, 2)
    with pytest.raises(ValueError, match="unknown schedule"):
        build_schedule("pipedream", 2, 2)


def test_explorer_redraws_and_shows_the_library_error():
    explorer = pipeline_explorer("1f1b", stages=2, microbatches=4)
    pick, p, m, v, t_f, t_b, t_w, t_comm, text, image = explorer.children
    assert "bubble 20.0%" in text.value and image.value[:4] == b"\x89PNG"
    assert v.disabled
    before = image.value
    m.value = 8
    assert "bubble 11.1%" in text.value and image.value != before
    p.value = 8  # 8 ranks, 8 micro-batches: still valid
    m.value = 3  # 1F1B with m < p
    assert "m=3 &lt; p=8" in text.value and image.value == b""
    p.value, m.value, pick.value = 2, 3, "interleaved"
    assert not v.disabled and "multiple of the stages" in text.value and image.value == b""
    m.value = 4
    assert "bubble" in text.value and "1/2 of a micro-batch" in text.value
    assert image.value[:4] == b"\x89PNG"
    assert "interactive in JupyterLab" in repr(explorer)
