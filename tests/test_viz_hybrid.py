"""Chapter 7's figures and planner explorer: each builds headless with its parts in place."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from course_lib.chapters import ch07_3d as ch7  # noqa: E402
from course_lib.cost import clusters, planner  # noqa: E402
from course_lib.cost.planner_model import Choice  # noqa: E402
from course_lib.viz import plots_hybrid as ph  # noqa: E402
from course_lib.viz import widgets_planner as wp  # noqa: E402
from course_lib.viz.palette import PALETTE  # noqa: E402

GRID_222 = {
    "coords": {r: (r // 4, r // 2 % 2, r % 2) for r in range(8)},
    "dp": [(0, 4), (1, 5), (2, 6), (3, 7)],
    "pp": [(0, 2), (1, 3), (4, 6), (5, 7)],
    "tp": [(0, 1), (2, 3), (4, 5), (6, 7)],
}


def _texts(fig: Figure) -> str:
    return "\n".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))


def _fonts_at_least_10(fig: Figure) -> None:
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert min(sizes) >= 10


def test_grid_figure_colours_each_axis_by_group():
    fig = ph.grid_figure(GRID_222)
    fig.canvas.draw()
    assert len(fig.axes) == 3
    for ax, axis in zip(fig.axes, ("tp", "pp", "dp"), strict=True):
        boxes = [p for p in ax.patches if p.get_gid() == "rank"]
        assert len(boxes) == 8
        faces = [to_hex(b.get_facecolor(), keep_alpha=False) for b in boxes]
        assert len(set(faces)) == 4  # four groups of two on every axis
        # the two members of each group share a colour (ranks in coords order)
        for group in GRID_222[axis]:
            assert len({faces[r] for r in group}) == 1, (axis, group)
        assert ph.AXIS_TITLES[axis] in _texts(fig)
    text = _texts(fig)
    assert "0: ranks 0, 4" in text and "1,1,1" in text and "stage 1" in text
    _fonts_at_least_10(fig)


def test_grid_figure_rejects_something_else():
    with pytest.raises(ValueError, match="grid_groups' result; it lacks"):
        ph.grid_figure({"coords": {0: (0, 0, 0)}})


def test_traffic_figure_has_two_bars_per_axis_and_the_compute_line():
    cfg = wp.MODELS["1.3B (24 x 2048)"]
    rows = ch7.axis_traffic(cfg, clusters.H100_CLUSTER, Choice(2, 2, 8, 8), 32, 2048)
    fig = ph.traffic_figure(rows)
    fig.canvas.draw()
    (ax,) = fig.axes
    assert len(ax.patches) == 6 and ax.get_yscale() == "log"
    text = _texts(fig)
    assert "NVLink" in text and "InfiniBand" in text and "compute per step" in text
    assert "tp = 8" in text and "GB sent per GPU" in text
    with pytest.raises(ValueError, match="axis_traffic's rows"):
        ph.traffic_figure([r for r in rows if r["axis"] != "compute"])


def test_plan_figure_stacks_memory_and_time():
    table = planner.plan(wp.MODELS["1.3B (24 x 2048)"], clusters.H100_CLUSTER, 8, 32, 2048)
    plans = table.plans[:4]
    fig = ph.plan_figure(plans, clusters.H100_CLUSTER.memory_bytes)
    fig.canvas.draw()
    left, right = fig.axes
    at = {round(t.get_position()[1]): t.get_text() for t in left.get_yticklabels()}
    assert [at[y] for y in sorted(at, reverse=True)] == [p.choice.label() for p in plans]
    widths = {}
    for bar in left.patches:  # the stacked bars of the first (top) plan sum to its memory
        y = round(bar.get_y() + bar.get_height() / 2)
        widths[y] = widths.get(y, 0) + bar.get_width()
    assert widths[len(plans) - 1] == pytest.approx(plans[0].memory["total"] / 2**30, rel=1e-6)
    assert "GPU memory (80 GiB)" in _texts(fig) and "compute" in _texts(fig)
    assert PALETTE["activations"] in {to_hex(b.get_facecolor()) for b in left.patches}
    with pytest.raises(ValueError, match="at least one Plan"):
        ph.plan_figure([])


def test_measured_figure_writes_the_ratios():
    fig = ph.measured_figure(["a", "b"], [2.0, 3.0], [1.0, 3.0], ylabel="ms")
    fig.canvas.draw()
    text = _texts(fig)
    assert "2.00x" in text and "1.00x" in text
    with pytest.raises(ValueError, match="as many labels"):
        ph.measured_figure(["a"], [1.0, 2.0], [1.0], ylabel="ms")


def test_planner_explorer_replans_and_shows_the_planners_error():
    explorer = wp.planner_explorer("1.3B (24 x 2048)", n_gpus=8, memory_gib=80, batch=32)
    model, gpus, memory, batch, text, image = explorer.children
    assert "configurations fit" in text.value and image.value[:4] == b"\x89PNG"
    rows = text.value.count("<tr>") - 1
    assert rows == 8
    model.value = "175B (96 x 12288)"
    memory.value = 24
    assert "nothing fits" in text.value and "closest" in text.value and image.value == b""
    memory.value = 141
    gpus.value = 1024
    batch.value = 1024
    assert "configurations fit" in text.value
    assert "interactive in JupyterLab" in repr(explorer)


def test_cluster_with_memory_changes_only_the_memory():
    cluster = wp.cluster_with_memory(40)
    assert cluster.memory_bytes == 40 * 2**30
    assert cluster.intra == clusters.H100_CLUSTER.intra
    assert cluster.peak_flops == clusters.H100_CLUSTER.peak_flops
