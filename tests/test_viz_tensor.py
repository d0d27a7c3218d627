"""Chapter 6's figures: each builds headless, with its blocks, labels and legends in place."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402
from matplotlib.colors import to_hex  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from course_lib.cost.tensor_model import block_comm_bytes, node_boundary_table  # noqa: E402
from course_lib.viz import plots_tensor as pt  # noqa: E402
from course_lib.viz.palette import PALETTE  # noqa: E402


def _texts(fig: Figure) -> str:
    """Every text of the figure (axes texts, titles, legends), joined."""
    parts = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    return "\n".join(parts)


def _gid(ax, gid: str) -> list:
    return [p for p in ax.patches if p.get_gid() == gid]


def _render(fig: Figure) -> None:
    fig.canvas.draw()  # layout and text rendering run without error


def _fonts_at_least_10(fig: Figure) -> None:
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]
    assert min(sizes) >= 10


@pytest.mark.parametrize("n", [2, 4])
def test_split_figure_colours_one_block_per_rank(n):
    fig = pt.split_figure(n)
    _render(fig)
    column, row = fig.axes
    # column-parallel: X whole + n strips of W + n strips of Y; row: n X + n W + Y whole
    assert len(_gid(column, "block")) == 1 + 2 * n
    assert len(_gid(row, "block")) == 2 * n + 1 and len(_gid(row, "partial")) == n
    faces = {to_hex(p.get_facecolor()) for p in _gid(column, "block")}
    assert len(faces) == n + 1  # one colour per rank, and the whole X
    text = _texts(fig)
    for words in ("Column-parallel", "Row-parallel", "all-reduce", "B·T × d_in", "d_out"):
        assert words in text
    assert f"d_out/{n}" in text and f"d_in/{n}" in text
    assert fig.legends and f"rank {n - 1}" in text
    _fonts_at_least_10(fig)


def test_split_figure_rejects_a_bad_rank_count():
    with pytest.raises(ValueError, match=r"n must be an integer number of ranks in \[1, 8\]"):
        pt.split_figure(0)


@pytest.mark.parametrize("sp", [False, True])
def test_mlp_figure_names_f_and_g_and_their_passes(sp):
    fig = pt.mlp_figure(sequence_parallel=sp)
    _render(fig)
    (ax,) = fig.axes
    assert len(_gid(ax, "operator")) == 2  # f and g span both ranks
    assert all(to_hex(p.get_facecolor()) == PALETTE["collective"] for p in _gid(ax, "operator"))
    ranks = _gid(ax, "rank")
    text = _texts(fig)
    for words in ("column-parallel", "row-parallel", "GeLU", "rank 0", "rank 1"):
        assert words in text
    if sp:
        assert "forward: all-gather" in text and "backward: reduce-scatter" in text
        assert "forward: reduce-scatter" in text and "backward: all-gather" in text
        assert "Korthikanti" in fig.get_suptitle() and "T/2 positions" in text
        assert len(ranks) == 2 * 7 and not _gid(ax, "replicated")  # LN, dropout per shard
    else:
        assert "forward: identity\nbackward: all-reduce" in text
        assert "forward: all-reduce\nbackward: identity" in text
        assert len(ranks) == 2 * 3 and len(_gid(ax, "replicated")) == 4
    _fonts_at_least_10(fig)


def test_node_boundary_figure_stacks_compute_and_communication():
    rows = node_boundary_table()
    fig = pt.node_boundary_figure(rows)
    _render(fig)
    left, right = fig.axes
    assert "modelled (alpha-beta), not measured" in fig.get_suptitle()
    bars = [p for p in left.patches if p.get_height() > 0 and abs(p.get_width() - 0.6) < 1e-9]
    compute = [b for b in bars if to_hex(b.get_facecolor()) == PALETTE["compute"]]
    assert [b.get_height() for b in compute] == pytest.approx([r["compute_s"] * 1e3 for r in rows])
    inter = [b for b in bars if to_hex(b.get_facecolor()) == PALETTE["comm_inter"]]
    assert len(inter) == 2  # tp = 16 and 32 cross the node boundary
    for ax in (left, right):
        assert "log2" in ax.get_xlabel()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "16", "32"]
        boundary = [line for line in ax.lines if line.get_linestyle() == ":"]
        assert boundary and boundary[0].get_xdata()[0] == pytest.approx(3.5)  # between 8, 16
    assert "(ms)" in left.get_ylabel() and right.get_ylim() == (0, 1)
    shares = {line.get_label(): line.get_ydata() for line in right.lines}
    real = next(v for k, v in shares.items() if "GPUs per node" in k)
    assert list(real) == pytest.approx([r["comm_share"] for r in rows])
    legend = _texts(fig)
    assert "node boundary (8 GPUs per node)" in legend and "InfiniBand" in legend
    assert not left.get_legend() and fig.legends  # one legend, outside the panels
    _fonts_at_least_10(fig)


def test_node_boundary_figure_needs_the_table_rows():
    with pytest.raises(ValueError, match="at least one row"):
        pt.node_boundary_figure([])
    with pytest.raises(ValueError, match=r"lack the key\(s\) \['comm_inter_s'"):
        pt.node_boundary_figure([{"tp": 1, "compute_s": 1.0, "comm_s": 0.0, "comm_intra_s": 0.0,
                                  "inside_node": True}])  # fmt: skip


def test_bytes_figure_puts_measured_beside_the_formula():
    rows = []
    for tp in (1, 2, 4):
        for sp in (False, True):
            formula = block_comm_bytes(4, 64, 128, tp, sp)["total"]
            rows.append(
                {"tp": tp, "measured": formula, "formula": formula, "sequence_parallel": sp}
            )
    fig = pt.bytes_figure(rows)
    _render(fig)
    (ax,) = fig.axes
    measured = [p for p in ax.patches if p.get_fill()]
    outlines = [p for p in ax.patches if not p.get_fill()]
    assert len(measured) == len(outlines) == 6
    assert sum(p.get_hatch() == "//" for p in measured) == 3  # the sequence-parallel bars
    assert "KiB" in ax.get_ylabel()  # 4*64*128*4 bytes = 128 KiB activations
    assert measured[2].get_height() == pytest.approx(rows[2]["measured"] / 1024)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
    assert "1.00x" in _texts(fig) and "measured, with SP" in _texts(fig)
    assert "tp" in ax.get_xlabel() and fig.legends
    _fonts_at_least_10(fig)
    with pytest.raises(ValueError, match="sequence_parallel"):
        pt.bytes_figure([{"tp": 2, "measured": 1, "formula": 1}])
