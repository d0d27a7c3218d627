"""The course's one colour palette: the same concept has the same colour in every chapter.

Plain strings, no matplotlib import: the chapter modules that spawned ranks import
(``course_lib.chapters.ch03_zero``, ...) read their colours from here without pulling
matplotlib into every rank. :mod:`course_lib.viz.plots` re-exports both names.

The colours are matplotlib's default cycle (``tab10``), so ``SEQUENCE[i]`` is the colour
``f"C{i}"`` a notebook gets, and a notebook's ad-hoc figure agrees with the library's.
Roles pick from it; a figure whose series have no role (per rank, per attention backend,
per hardware) takes ``SEQUENCE[i]`` for its ``i``-th series.
"""

from __future__ import annotations

SEQUENCE: tuple[str, ...] = (
    "#1f77b4",  # C0 blue
    "#ff7f0e",  # C1 orange
    "#2ca02c",  # C2 green
    "#d62728",  # C3 red
    "#9467bd",  # C4 purple
    "#8c564b",  # C5 brown
    "#e377c2",  # C6 pink
    "#7f7f7f",  # C7 grey
    "#bcbd22",  # C8 olive
    "#17becf",  # C9 cyan
)
_BLUE, _ORANGE, _GREEN, _RED, _PURPLE, _BROWN, _PINK, _GREY, *_ = SEQUENCE

PALETTE: dict[str, str] = {
    # What a rank holds (chapters 0 and 3): one colour per kind of training state.
    "params": _BLUE,
    "grads": _ORANGE,
    "optimizer": _GREEN,  # Adam's m and v (and fp32 master weights in mixed precision)
    "activations": _PURPLE,
    "absent": "#eeeeee",  # a piece this rank does not hold
    # Measured against predicted: measured points in a series' colour, formulas in black.
    "measured": _BLUE,
    "predicted": "black",  # formulas and models (alpha-beta, 2(N-1)/N, 16 bytes/param)
    "device": "black",  # a GPU's memory (horizontal lines, one line style per GPU)
    "guide": "black",  # fixed marks to read a figure by: a day, a month, a year
    # Ours against PyTorch's: the yardstick (built-in collective, DDP, one device) is grey.
    "ours": _BLUE,
    "torch": _GREY,
    "reference": _GREY,  # the single-device reference, baselines such as unigram entropy
    # Training curves.
    "train": _BLUE,
    "validation": _ORANGE,
    # One colour per strategy, keyed by its name in course_lib.train.STRATEGIES. The
    # references are grey; FSDP is ZeRO-3's algorithm and chapter 4's all-reduce SGD is
    # data parallelism, so they take those colours.
    "single": _GREY,
    "sgd": _GREY,  # chapter 4's single-device SGD reference
    "dp": _BLUE,
    "all-reduce": _BLUE,
    "zero1": _ORANGE,
    "zero2": _GREEN,
    "zero3": _RED,
    "fsdp": _RED,
    "ps-sync": _PURPLE,
    "ps-async": _BROWN,
    "ps-ssp": _PINK,
    "pp": SEQUENCE[9],  # cyan: chapter 5's pipeline parallelism
    "tp": SEQUENCE[8],  # olive: chapter 6's tensor parallelism
    "hybrid": "#1a1a1a",  # near-black: chapter 7's dp x pp x tp grid, every axis at once
    # Pipeline actions (chapter 5), keyed by Action.op: forward, backward (the input
    # gradient when W is split off), weight gradient; and a rank's idle time (the bubble).
    "F": _BLUE,
    "B": _ORANGE,
    "W": _GREEN,
    "idle": "#f2f2f2",
    # Chapter 6 (tensor parallelism): a layer's modelled time split into compute and
    # communication, the communication coloured by the link it crosses; the f / g
    # operators (collectives) of the Megatron dataflow. A figure's ranks take SEQUENCE[rank].
    "compute": _GREEN,
    "comm_intra": _PURPLE,  # inside a node (NVLink)
    "comm_inter": _RED,  # across nodes (InfiniBand)
    "collective": "#fbe3e3",  # f / g boxes: a pale red, the colour of communication
    "replicated": "#dddddd",  # a tensor or layer every rank holds whole
}


def color(i: int) -> str:
    """The ``i``-th colour of :data:`SEQUENCE`, wrapping around (``f"C{i}"`` as a hex string)."""
    return SEQUENCE[i % len(SEQUENCE)]

