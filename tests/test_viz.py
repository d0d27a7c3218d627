"""One palette: the same concept has the same colour in every chapter's figures."""

from __future__ import annotations

import re
import subprocess
import sys

import matplotlib
import numpy as np

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from course_lib.chapters import ch03_zero as chapter3  # noqa: E402
from course_lib.cost.cost_model import GPU_MEMORY, training_memory  # noqa: E402
from course_lib.train import STRATEGIES  # noqa: E402
from course_lib.viz import plots, plots_memory  # noqa: E402
from course_lib.viz.palette import PALETTE, SEQUENCE, color  # noqa: E402

KINDS = ("params", "grads", "optimizer")


def _bar_colours(fig) -> dict[str, set[str]]:
    """Legend label -> face colours of the bars drawn under it, over all axes."""
    out: dict[str, set[str]] = {}
    for ax in fig.axes:
        for container in ax.containers:
            label = container.get_label()
            out.setdefault(label, set()).update(to_hex(p.get_facecolor()) for p in container)
    return out


def test_palette_module_and_spawned_chapters_do_not_import_matplotlib():
    code = (
        "import sys, course_lib.viz.palette, course_lib.chapters.ch03_zero, "
        "course_lib.chapters.ch04_parameter_server, course_lib.chapters.ch01_collectives; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sequence_is_matplotlibs_default_cycle():
    # so that a notebook's f"C{i}" and the library's color(i) are one colour
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    assert [to_hex(c) for c in cycle] == list(SEQUENCE)
    assert color(0) == SEQUENCE[0] and color(len(SEQUENCE)) == SEQUENCE[0]
    assert plots.PALETTE is PALETTE and plots.SEQUENCE is SEQUENCE


def test_every_strategy_and_state_kind_has_a_colour():
    assert set(STRATEGIES) <= set(PALETTE)
    assert len({PALETTE[k] for k in (*KINDS, "activations")}) == 4
    assert len({PALETTE[s] for s in ("dp", "zero1", "zero2", "zero3")}) == 4


def test_chapter0_and_chapter3_colour_the_state_kinds_alike():
    from course_lib.viz import widgets

    want = {k: {to_hex(PALETTE[k])} for k in KINDS}
    breakdown = training_memory(1_000_000_000, activations=2**30)
    ch0 = _bar_colours(plots_memory.plot_memory_breakdown({"1B": breakdown}, GPU_MEMORY))
    assert {k: ch0[k] for k in KINDS} == want
    assert ch0["activations"] == {to_hex(PALETTE["activations"])}
    ch3 = _bar_colours(widgets.plot_zero_memory(7e9, (1, 8)))
    assert {k: ch3[k] for k in KINDS} == want
    fig = chapter3.plot_who_holds_what(2)
    patches = [p for ax in fig.axes for p in ax.patches if isinstance(p, Rectangle)]
    held = {to_hex(p.get_facecolor()) for p in patches}
    assert held == {to_hex(PALETTE[k]) for k in (*KINDS, "absent")}
    plt.close("all")


def test_chapter3_bytes_sent_colours_each_stage_by_its_strategy():
    fake = {
        n: [{s: {"psi": 10, "bytes_sent": 40 * (n - 1)} for s in chapter3.STAGES}] for n in (1, 2)
    }
    fig = chapter3.plot_bytes_sent(fake)
    lines = {line.get_label(): to_hex(line.get_color()) for line in fig.axes[0].lines}
    for stage in chapter3.STAGES:
        assert lines[f"{stage} (measured)"] == to_hex(PALETTE[stage])
    assert lines["2(N-1)/N"] == to_hex(PALETTE["predicted"])
    plt.close("all")


def test_chapter0_figures_label_memory_in_binary_units():
    breakdown = training_memory(1_000_000_000, activations=2**30)
    fig = plots_memory.plot_memory_breakdown({"1B": breakdown}, GPU_MEMORY)
    ax = fig.axes[0]
    texts = [ax.get_ylabel(), *(t.get_text() for t in ax.texts)]
    texts += [t.get_text() for t in ax.get_legend().get_texts()]
    assert "GiB" in ax.get_ylabel()
    assert not any(re.search(r"\bGB\b", t) for t in texts), texts
    plt.close("all")


def test_activation_figure_draws_slope_one_and_two_guides_and_the_difference_panel():
    ts = [16, 32, 64, 128]
    flash = [100 * t for t in ts]
    math_ = [100 * t + 3 * t * t for t in ts]
    data = {"flash": flash, "math": math_}
    fig = plots_memory.plot_activation_check(ts, data, data, difference=("math", "flash"))
    assert len(fig.axes) == 2 and all("MiB" in ax.get_ylabel() for ax in fig.axes)
    for ax in fig.axes:
        guides = [line for line in ax.lines if line.get_color() == PALETTE["guide"]]
        slopes = sorted(
            round(float(np.log(y[1] / y[0]) / np.log(x[1] / x[0])), 6)
            for x, y in (line.get_data() for line in guides)
        )
        assert slopes == [1.0, 2.0]
    right = fig.axes[1].lines[0].get_ydata() * 2**20  # the formula's math - flash, bytes
    assert np.allclose(right, [3 * t * t for t in ts])
    plt.close("all")
