"""Chapter 6's figures: splitting a linear layer, Megatron's MLP, bytes, and the node boundary.

Two diagrams and two plots. :func:`split_figure` draws the matrix maths of splitting
Y = X W by columns and by rows, :func:`mlp_figure` the MLP block as a dataflow with its f
and g operators (and their sequence-parallel forms). :func:`node_boundary_figure` plots
the modelled time of one layer against tp from :func:`course_lib.cost.tensor_model.
node_boundary_table`, and :func:`bytes_figure` the measured bytes per block beside the
formula of :func:`course_lib.cost.tensor_model.block_comm_bytes`.

As in :mod:`course_lib.viz.plots`, figures are built on :class:`~matplotlib.figure.Figure`
directly (no pyplot) and every function returns its Figure. Rank r takes ``SEQUENCE[r]``
(a pale tint of it for boxes with text); what every rank holds whole is
``PALETTE["replicated"]``, the collectives ``PALETTE["collective"]``. Legends sit outside
the data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from course_lib.viz.palette import PALETTE, color

_FONT = 10  # the smallest font size of the course's figures, in points

# ---------------------------------------------------------------------------------------
# Drawing helpers: boxes with text, arrows
# ---------------------------------------------------------------------------------------


def _tint(colour: str, mix: float = 0.55) -> str:
    """``colour`` mixed with white by ``mix`` (0: itself, 1: white), as a hex string."""
    return to_hex(tuple(c + (1 - c) * mix for c in to_rgb(colour)))


def _rank_face(rank: int) -> str:
    return _tint(color(rank))


def _box(ax: Axes, x: float, y: float, w: float, h: float, face: str, text: str = "",
         gid: str = "block", size: float = _FONT) -> Rectangle:  # fmt: skip
    """A rectangle from (x, y) of size (w, h) with centred text; tagged ``gid`` for tests."""
    box = Rectangle((x, y), w, h, facecolor=face, edgecolor="black", linewidth=0.8, zorder=2)
    ax.add_patch(box).set_gid(gid)
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, zorder=3)
    return box


def _arrow(ax: Axes, start: tuple[float, float], end: tuple[float, float], text: str = "") -> None:
    ax.annotate("", xy=end, xytext=start, zorder=1,
                arrowprops={"arrowstyle": "-|>", "color": "black", "lw": 1.0})  # fmt: skip
    if text:
        middle = ((start[0] + end[0]) / 2, (start[1] + end[1]) / 2 + 0.12)
        ax.text(*middle, text, ha="center", va="bottom", fontsize=_FONT)


def _diagram_axes(ax: Axes, xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.axis("off")


def _rank_legend(fig: Figure, n: int, extra: Sequence[Patch] = ()) -> None:
    handles = [Patch(facecolor=_rank_face(r), edgecolor="black", label=f"rank {r}")
               for r in range(n)]  # fmt: skip
    fig.legend(handles=[*handles, *extra], loc="outside lower center", ncol=len(handles) + 2,
               frameon=False, fontsize=_FONT)  # fmt: skip


def _check_ranks(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 8:
        raise ValueError(f"n must be an integer number of ranks in [1, 8] to draw, got {n!r}")


# ---------------------------------------------------------------------------------------
# 1. Splitting Y = X W by columns and by rows
# ---------------------------------------------------------------------------------------

_BT, _DIN, _DOUT = 2.4, 2.0, 3.0  # drawn heights/widths of B·T, d_in and d_out
_GAP = 1.0  # room for the "x" and "=" signs between matrices


def _sign(ax: Axes, x: float, text: str) -> None:
    ax.text(x, _BT / 2, text, ha="center", va="center", fontsize=18)


def _under(ax: Axes, x: float, text: str, y: float = 0.0) -> None:
    """A shape label under a matrix whose bottom edge is at ``y``."""
    ax.text(x, y - 0.25, text, ha="center", va="top", fontsize=_FONT)


def _concat(n: int) -> str:
    """The column blocks side by side: "[$Y_0$ | $Y_1$]", or with an ellipsis beyond 3."""
    names = [f"$Y_{{{r}}}$" for r in range(n)]
    return "[" + " | ".join(names if n <= 3 else [*names[:2], "…", names[-1]]) + "]"


def _column_panel(ax: Axes, n: int) -> None:
    """X whole on every rank; W and Y split by output columns; no communication."""
    _box(ax, 0, 0, _DIN, _BT, PALETTE["replicated"], "X")
    _under(ax, _DIN / 2, "X: B·T × d_in\nwhole, on every rank")
    _sign(ax, _DIN + _GAP / 2, "×")
    x0, y0, w = _DIN + _GAP, (_BT - _DIN) / 2, _DOUT / n
    for r in range(n):
        _box(ax, x0 + r * w, y0, w, _DIN, _rank_face(r), f"$W_{r}$")
    _under(ax, x0 + _DOUT / 2, f"$W_r$: d_in × d_out/{n}", y0)
    _sign(ax, x0 + _DOUT + _GAP / 2, "=")
    x1 = x0 + _DOUT + _GAP
    for r in range(n):
        _box(ax, x1 + r * w, 0, w, _BT, _rank_face(r), f"$Y_{r}$")
    _under(ax, x1 + _DOUT / 2, f"$Y_r = X\\,W_r$: B·T × d_out/{n}\non rank r; Y = {_concat(n)}")
    ax.set_title("Column-parallel: W split by its output columns; each rank computes its own "
                 "columns of Y (no communication in forward)", fontsize=11, loc="left")  # fmt: skip


def _row_panel(ax: Axes, n: int) -> float:
    """X and W split along d_in; full-size partial Y's, summed by an all-reduce."""
    w = _DIN / n
    for r in range(n):
        _box(ax, r * w, 0, w, _BT, _rank_face(r), f"$X_{r}$")
    _under(ax, _DIN / 2, f"$X_r$: B·T × d_in/{n}")
    _sign(ax, _DIN + _GAP / 2, "×")
    x0, y0, h = _DIN + _GAP, (_BT - _DIN) / 2, _DIN / n
    for r in range(n):  # rank 0's rows on top
        _box(ax, x0, y0 + _DIN - (r + 1) * h, _DOUT, h, _rank_face(r), f"$W_{r}$")
    _under(ax, x0 + _DOUT / 2, f"$W_r$: d_in/{n} × d_out", y0)
    _sign(ax, x0 + _DOUT + _GAP / 2, "=")
    x1, step = x0 + _DOUT + _GAP, 0.18
    for r in reversed(range(n)):  # a deck of full-size partial sums, rank 0 in front
        _box(ax, x1 + r * step, -r * step, _DOUT, _BT, _rank_face(r),
             "$Y_0 = X_0\\,W_0$" if r == 0 else "", gid="partial")  # fmt: skip
    _under(
        ax,
        x1 + _DOUT / 2,
        f"{n} partial $Y_r = X_r W_r$\neach B·T × d_out (full size)",
        -(n - 1) * step,
    )
    x2 = x1 + _DOUT + (n - 1) * step + 2.2
    _arrow(ax, (x2 - 2.0, _BT / 2), (x2 - 0.1, _BT / 2), "all-reduce\n(sum)")
    _box(ax, x2, 0, _DOUT, _BT, PALETTE["replicated"], "$Y = \\sum_r X_r W_r$")
    _under(ax, x2 + _DOUT / 2, "Y: B·T × d_out\non every rank")
    ax.set_title("Row-parallel: W split by its input rows, X by its columns; each rank computes "
                 "a full-size partial Y, and Y is their sum (an all-reduce)", fontsize=11,
                 loc="left")  # fmt: skip
    return x2 + _DOUT


def split_figure(n: int = 2) -> Figure:
    """Chapter 6: the matrix maths of splitting a linear layer Y = X W over ``n`` ranks.

    Top, column-parallel: W split by output columns, X whole on every rank, rank r
    computes the columns Y_r = X W_r with no communication. Bottom, row-parallel: W split
    by input rows and X by its columns; rank r computes a full-size partial Y_r = X_r W_r,
    and the all-reduce of the partials is Y. One colour per rank, shapes in B·T, d_in,
    d_out.
    """
    _check_ranks(n)
    fig = Figure(figsize=(12, 7.2), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    _column_panel(top, n)
    right = _row_panel(bottom, n)
    for ax in (top, bottom):
        _diagram_axes(ax, (-0.3, right + 0.3), (-1.3 - 0.18 * (n - 1), _BT + 0.3))
    whole = Patch(facecolor=PALETTE["replicated"], edgecolor="black",
                  label="whole (every rank holds all of it)")  # fmt: skip
    _rank_legend(fig, n, [whole])
    fig.suptitle(f"Splitting a linear layer Y = X W over N = {n} ranks", fontsize=13)
    return fig


# ---------------------------------------------------------------------------------------
# 2. Megatron's MLP: f -> column-parallel -> GeLU -> row-parallel -> g
# ---------------------------------------------------------------------------------------

_W, _H, _STEP = 1.62, 1.1, 2.0  # box width and height, column pitch
_ROWS = (1.6, 0.0)  # y of rank 0's and rank 1's boxes
_TOP = _ROWS[0] + _H

_NOTES = {
    False: ("f\nforward: identity\nbackward: all-reduce",
            "g\nforward: all-reduce\nbackward: identity"),
    True: ("f (the paper's g)\nforward: all-gather\n(along the sequence)\n"
           "backward: reduce-scatter",
           "g (the paper's $\\bar{g}$)\nforward: reduce-scatter\n(along the sequence)\n"
           "backward: all-gather"),
}  # fmt: skip


def _mlp_columns(sp: bool) -> list[tuple[str, Any]]:
    """(header, content) per column; content: a str (one box for both ranks, replicated),
    None (the f / g operator), or a function rank -> text (one box per rank)."""
    shard = "(B, T/2, d)"
    return [
        ("input", (lambda r: f"$X^s_{r}$\n{shard}") if sp else "X\n(B, T, d)"),
        ("LayerNorm", (lambda r: "LayerNorm\nT/2 positions") if sp else "LayerNorm\nall T"),
        ("", None),
        ("column-parallel\nc_fc", lambda r: f"$X A_{r}$\n(B, T, 4d/2)"),
        ("GeLU", lambda r: f"$Y_{r}$ =\nGeLU($XA_{r}$)"),
        ("row-parallel\nc_proj", lambda r: f"$Y_{r} B_{r}$\npartial (B, T, d)"),
        ("", None),
        ("dropout", (lambda r: "dropout\nT/2 positions") if sp else "dropout\nall T"),
        ("output", (lambda r: f"$Z^s_{r}$\n{shard}") if sp else "Z\n(B, T, d)"),
    ]


def _mlp_column(ax: Axes, x: float, content: Any, note: str) -> None:
    if content is None:  # an f or g operator across both ranks
        name = note.split("\n")[0][0]
        _box(ax, x, _ROWS[1], _W, _TOP - _ROWS[1], PALETTE["collective"], name, "operator", 18)
        ax.text(x + _W / 2, _ROWS[1] - 0.2, note, ha="center", va="top", fontsize=_FONT)
    elif isinstance(content, str):  # the same on every rank
        _box(ax, x, _ROWS[1], _W, _TOP - _ROWS[1], PALETTE["replicated"], content, "replicated")
    else:
        for r, y in enumerate(_ROWS):
            _box(ax, x, y, _W, _H, _rank_face(r), content(r), "rank")


def mlp_figure(sequence_parallel: bool = False) -> Figure:
    """Chapter 6: Megatron's MLP block over two ranks, as a dataflow.

    X -> f -> column-parallel c_fc (GeLU on each rank's own columns) -> row-parallel c_proj
    -> g -> Z, one row per rank [Megatron, Fig. 3a]. f is identity forward / all-reduce
    backward, g all-reduce forward / identity backward: the only communication. With
    ``sequence_parallel`` the LayerNorm and dropout run on sequence shards (T/2 positions
    per rank), f becomes an all-gather along the sequence (backward: reduce-scatter) and g
    a reduce-scatter (backward: all-gather) [Korthikanti et al. 2022, Fig. 5, where they
    are named g and g-bar].
    """
    sp = bool(sequence_parallel)
    columns = _mlp_columns(sp)
    notes = iter(_NOTES[sp])
    fig = Figure(figsize=(15, 4.6 if sp else 4.2), layout="constrained")
    ax = fig.subplots()
    for i, (header, content) in enumerate(columns):
        x = i * _STEP
        _mlp_column(ax, x, content, next(notes) if content is None else "")
        ax.text(x + _W / 2, _TOP + 0.15, header, ha="center", va="bottom", fontsize=_FONT)
        if i:
            for y in _ROWS:
                _arrow(ax, (x - _STEP + _W, y + _H / 2), (x, y + _H / 2))
    for r, y in enumerate(_ROWS):
        ax.text(-0.15, y + _H / 2, f"rank {r}", ha="right", va="center", fontsize=_FONT)
    right = (len(columns) - 1) * _STEP + _W
    _diagram_axes(ax, (-1.3, right + 0.2), (-1.6 if sp else -1.25, _TOP + 0.8))
    legend = [Patch(facecolor=PALETTE["collective"], edgecolor="black",
                    label="communication (f, g)")]  # fmt: skip
    if not sp:
        legend.insert(0, Patch(facecolor=PALETTE["replicated"], edgecolor="black",
                               label="same on every rank (replicated)"))  # fmt: skip
    _rank_legend(fig, 2, legend)
    title = ("Megatron's MLP with sequence parallelism (Korthikanti et al. 2022, Fig. 5): "
             "LayerNorm and dropout on sequence shards" if sp else
             "Megatron's MLP over two ranks (Shoeybi et al. 2019, Fig. 3a): f and g are its "
             "only communication")  # fmt: skip
    fig.suptitle(title, fontsize=12)
    return fig


# ---------------------------------------------------------------------------------------
# 3. The node boundary: modelled time of one layer against tp
# ---------------------------------------------------------------------------------------

_BOUNDARY_KEYS = ("tp", "compute_s", "comm_s", "comm_intra_s", "comm_inter_s", "inside_node")


def _check_rows(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], where: str) -> None:
    if not rows:
        raise ValueError(f"{where} needs at least one row, got none")
    missing = sorted({k for row in rows for k in keys if k not in row})
    if missing:
        raise ValueError(f"{where}: rows lack the key(s) {missing}; each row needs {list(keys)}")


def _boundary(ax: Axes, x: float, gpus: int) -> None:
    ax.axvspan(x, ax.get_xlim()[1], color=PALETTE["idle"], zorder=0,
               label="ring spans nodes")  # fmt: skip
    ax.axvline(x, color=PALETTE["guide"], ls=":", lw=1.5,
               label=f"node boundary ({gpus} GPUs per node)")  # fmt: skip


def _time_panel(ax: Axes, rows: Sequence[Mapping[str, Any]], xs: np.ndarray) -> None:
    compute = np.array([r["compute_s"] for r in rows]) * 1e3  # ms
    comm = np.array([r["comm_s"] for r in rows]) * 1e3
    inside = np.array([bool(r["inside_node"]) for r in rows])
    ax.bar(xs, compute, width=0.6, color=PALETTE["compute"], label="compute")
    for where, key, mask in (("inside a node", "comm_intra", inside),
                             ("across nodes", "comm_inter", ~inside)):  # fmt: skip
        links = sorted(
            {r.get("link", "") for r, m in zip(rows, mask, strict=True) if m} - {"none", ""}
        )
        label = f"communication {where}" + (f" ({', '.join(links)})" if links else "")
        if mask.any():
            ax.bar(xs[mask], comm[mask], width=0.6, bottom=compute[mask], color=PALETTE[key],
                   label=label)  # fmt: skip
    for x, c, m in zip(xs, compute, comm, strict=True):
        ax.text(x, c + m, f"{m / (c + m):.0%}", ha="center", va="bottom", fontsize=_FONT)
    ax.set_ylabel("one layer, forward + backward (ms)")
    ax.set_title("time per layer per rank (communication share on top)", fontsize=11)
    ax.set_ylim(0, 1.12 * float((compute + comm).max()))


def _share_panel(ax: Axes, rows: Sequence[Mapping[str, Any]], xs: np.ndarray, gpus: int) -> None:
    """Communication share against tp: the real layout (thick, under), either link alone."""
    compute = np.array([r["compute_s"] for r in rows])
    lines = (
        ("comm_s", "-", PALETTE["predicted"], f"share: {gpus} GPUs per node, then across"),
        ("comm_intra_s", "--", PALETTE["comm_intra"], "share if every hop were intra-node"),
        ("comm_inter_s", "-.", PALETTE["comm_inter"], "share if every hop were inter-node"),
    )
    for key, style, colour, label in lines:  # fmt: skip
        comm = np.array([r[key] for r in rows])
        total = compute + comm
        share = np.divide(comm, total, out=np.zeros_like(comm), where=total > 0)
        real = key == "comm_s"
        ax.plot(xs, share, style, marker="o", color=colour, lw=5 if real else 1.5,
                alpha=0.3 if real else 1.0, ms=9 if real else 5, label=label)  # fmt: skip
    ax.set_ylim(0, 1)
    ax.set_ylabel("communication share of the layer's time")
    ax.set_title("communication share of one layer's time", fontsize=11)


def node_boundary_figure(
    results: Sequence[Mapping[str, Any]], *, title: str | None = None
) -> Figure:
    """Chapter 6: why tensor parallelism stays inside a node, modelled (alpha-beta).

    ``results`` are the rows of :func:`course_lib.cost.tensor_model.node_boundary_table`.
    Left: one layer's forward + backward time per rank (ms) against tp on a log2 axis,
    compute below, communication above, coloured by the link it crosses. Right: the
    communication share, for the real layout (intra-node link up to ``gpus_per_node``,
    the inter-node link beyond) and for either link everywhere. The node boundary is the
    dotted line; the shaded side is where the ring spans nodes. Not measured.
    """
    _check_rows(results, _BOUNDARY_KEYS, "node_boundary_figure")
    rows = sorted(results, key=lambda r: r["tp"])
    tps = [r["tp"] for r in rows]
    xs = np.log2(tps)
    gpus = int(rows[0].get("gpus_per_node", 8))
    fig = Figure(figsize=(12, 5.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    _time_panel(left, rows, xs)
    _share_panel(right, rows, xs, gpus)
    for ax in (left, right):
        ax.set_xlim(xs.min() - 0.5, xs.max() + 0.5)
        ax.set_xticks(xs, [str(t) for t in tps])
        ax.set_xlabel("tensor-parallel ranks tp (log2 scale)")
        _boundary(ax, np.log2(gpus) + 0.5, gpus)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    labelled = {}  # one legend for both panels, below them: no entry covers data
    for ax in (left, right):
        handles, labels = ax.get_legend_handles_labels()
        labelled.update(zip(labels, handles, strict=True))
    last = ("node boundary", "ring spans")  # the guides after the data
    order = sorted(labelled, key=lambda label: (label.startswith(last), label != "compute"))
    fig.legend([labelled[k] for k in order], order, loc="outside lower center", ncol=3,
               frameon=False, fontsize=_FONT)  # fmt: skip
    fig.suptitle(title or "Why tensor parallelism stays inside a node: modelled (alpha-beta), "
                 "not measured", fontsize=13)  # fmt: skip
    return fig


# ---------------------------------------------------------------------------------------
# 4. Bytes per block per pass: measured against the formula
# ---------------------------------------------------------------------------------------

_BYTES_KEYS = ("tp", "measured", "formula", "sequence_parallel")
_UNITS = ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB"), (1, "bytes"))


def _unit(largest: float) -> tuple[float, str]:
    return next((s, u) for s, u in _UNITS if largest >= s or s == 1)


def bytes_figure(rows: Sequence[Mapping[str, Any]], *, title: str | None = None) -> Figure:
    """Chapter 6: bytes one rank sends per block per pass, measured beside the formula.

    ``rows`` are dicts with ``tp``, ``measured`` and ``formula`` (bytes) and
    ``sequence_parallel`` (bool): a bar per row (measured, hatched with sequence
    parallelism) with the formula as a black bar outline over it, and the ratio
    measured / formula above. The chapter fills it from its measurement.
    """
    _check_rows(rows, _BYTES_KEYS, "bytes_figure")
    tps = sorted({r["tp"] for r in rows})
    modes = sorted({bool(r["sequence_parallel"]) for r in rows})
    scale, unit = _unit(max(max(r["measured"], r["formula"]) for r in rows))
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(modes)
    for row in rows:
        k = modes.index(bool(row["sequence_parallel"]))
        x = tps.index(row["tp"]) + (k - (len(modes) - 1) / 2) * width
        m, f = row["measured"] / scale, row["formula"] / scale
        sp = bool(row["sequence_parallel"])
        ax.bar(x, m, width * 0.9, color=PALETTE["measured"], hatch="//" if sp else None,
               edgecolor="white", label=f"measured, {'with' if sp else 'without'} SP")  # fmt: skip
        ax.bar(x, f, width * 0.9, fill=False, edgecolor=PALETTE["predicted"], lw=1.5,
               label="formula: 4(N-1)/N · B·T·d · bytes per element")  # fmt: skip
        ratio = f"{row['measured'] / row['formula']:.2f}x" if row["formula"] else "-"
        ax.text(x, max(m, f), ratio, ha="center", va="bottom", fontsize=_FONT)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))
    fig.legend(unique.values(), unique.keys(), loc="outside lower center", ncol=2,
               frameon=False, fontsize=_FONT)  # fmt: skip
    ax.set_xticks(range(len(tps)), [str(t) for t in tps])
    ax.set_xlabel("tensor-parallel ranks tp")
    ax.set_ylabel(f"sent per rank, one block, one pass ({unit})")
    top = max(max(r["measured"], r["formula"]) for r in rows) / scale
    ax.set_ylim(0, 1.15 * top if top else 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.set_title(title or "Bytes per block per pass: measured vs formula", fontsize=12)
    return fig
