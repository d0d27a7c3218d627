"""Interactive explorers for the notebooks (ipywidgets), each with a static twin figure.

Chapter 3: :func:`zero_memory_explorer` picks a model size, a number of ranks, a ZeRO
stage, a precision and a GPU, and shows the bytes each rank holds for parameters,
gradients and optimizer state, and whether they fit. The book has no kernel, so
:func:`plot_zero_memory` draws the same numbers as a static figure.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import ipywidgets as w

from course_lib.cost.cost_model import GPU_MEMORY, H100_BYTES, PRECISIONS
from course_lib.parallel.zero import zero_memory_formula
from course_lib.viz.palette import PALETTE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

STAGE_NAMES = {0: "DP", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
KINDS = ("params", "grads", "optimizer")  # coloured by PALETTE[kind], as in every chapter


def zero_bytes_per_rank(
    n_params: float, world_size: int, stage: int, precision: str = "mixed"
) -> dict[str, float]:
    """Chapter 3: bytes per rank of parameters, gradients and optimizer state.

    ``precision`` is a key of ``cost_model.PRECISIONS``: ``"fp32"`` is 4 + 4 + 8 bytes per
    parameter (this course's runs), ``"mixed"`` the ZeRO paper's 2 + 2 + K with K = 12
    (fp32 master weights + Adam's m and v). Stage 0 is plain data parallelism; stage s
    divides the first s of (optimizer, grads, params) by N, as in
    :func:`course_lib.parallel.zero.zero_memory_formula`.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if stage not in STAGE_NAMES:
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    b = PRECISIONS[precision]
    fp32 = zero_memory_formula(1, world_size, stage, k=b.optimizer + b.master)  # per param
    return {
        "params": n_params * fp32["params"] * b.param / 4,
        "grads": n_params * fp32["grads"] * b.grad / 4,
        "optimizer": n_params * fp32["optimizer"],
    }


def plot_zero_memory(
    n_params: float,
    world_sizes: tuple[int, ...] = (1, 8, 64),
    precision: str = "mixed",
    device_bytes: int = H100_BYTES,
    title: str | None = None,
) -> Figure:
    """Chapter 3: stacked GiB per rank for each stage and world size, with the GPU line.

    Every memory number is in GiB (2**30 bytes), as everywhere in the course. The title
    sits above the panels and the bars leave room for their labels, so nothing overlaps.
    """
    import matplotlib.pyplot as plt

    gib = 2**30
    width = max(3.3 * len(world_sizes), 6.0)
    fig, axes = plt.subplots(1, len(world_sizes), figsize=(width, 4.0), sharey=True)
    axes = [axes] if len(world_sizes) == 1 else list(axes)
    tallest = device_bytes / gib
    for ax, n in zip(axes, world_sizes, strict=True):
        for stage, name in STAGE_NAMES.items():
            parts = zero_bytes_per_rank(n_params, n, stage, precision)
            bottom = 0.0
            for kind in KINDS:
                label = kind if (stage == 0 and ax is axes[-1]) else None
                ax.bar(name, parts[kind] / gib, bottom=bottom, color=PALETTE[kind], label=label)
                bottom += parts[kind] / gib
            verdict = "fits" if bottom * gib <= device_bytes else "too big"
            ax.text(stage, bottom, f"{bottom:.3g}\n{verdict}", ha="center", va="bottom", fontsize=7)
            tallest = max(tallest, bottom)
        ax.axhline(device_bytes / gib, color=PALETTE["device"], ls="--", lw=1)
        ax.set_title(f"N = {n}", fontsize=9, pad=4)
        ax.tick_params(axis="x", labelsize=8)
    axes[0].set_ylim(0, tallest * 1.3)  # room for the two-line labels above the bars
    axes[0].set_ylabel("GiB per rank (model states)")
    axes[-1].legend(fontsize=7, loc="upper right")
    pretty = f"{n_params / 1e9:g}B parameters, {precision}"
    gpu = f"dashed line: a {device_bytes / gib:.0f} GiB GPU"
    fig.suptitle(title or f"{pretty}: GiB per rank ({gpu})", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


class Explorer(w.VBox):
    """A VBox whose plain-text form (what a page without a kernel shows) is one sentence."""

    def __init__(self, children: list[w.Widget], name: str) -> None:
        super().__init__(children)
        self._explorer_name = name

    def __repr__(self) -> str:
        return (
            f"[{self._explorer_name}: interactive in JupyterLab; the static figure below shows it]"
        )


def zero_memory_explorer(n_params: float = 7e9) -> Explorer:
    """Chapter 3: sliders for model size x world size x stage -> bytes per rank, and fits?"""
    import io

    import matplotlib.pyplot as plt

    size = w.FloatLogSlider(value=n_params, base=10, min=8, max=12, step=0.05,
                            description="params", readout_format=".3g")  # fmt: skip
    world = w.SelectionSlider(options=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024], value=8,
                              description="ranks N")  # fmt: skip
    stage = w.ToggleButtons(options=[(v, k) for k, v in STAGE_NAMES.items()], value=3)
    precision = w.ToggleButtons(options=sorted(PRECISIONS), value="mixed")
    gpu = w.Dropdown(options=list(GPU_MEMORY.items()), value=H100_BYTES,
                     description="GPU")  # fmt: skip
    text, plot = w.HTML(), w.Image(format="png")  # PNG bytes: no output area to replay

    def update(*_: object) -> None:
        parts = zero_bytes_per_rank(size.value, world.value, stage.value, precision.value)
        total = sum(parts.values())
        fits = "fits" if total <= gpu.value else "does NOT fit"
        detail = ", ".join(f"{k} {v / 2**30:.1f}" for k, v in parts.items())
        text.value = (
            f"<b>{total / 2**30:.1f} GiB per rank</b> ({detail} GiB): {fits} in "
            f"{gpu.value / 2**30:.0f} GiB, before activations"
        )
        ns = tuple(sorted({1, world.value}))
        fig = plot_zero_memory(size.value, ns, precision.value, gpu.value)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=80)
        plt.close(fig)
        plot.value = png.getvalue()

    for control in (size, world, stage, precision, gpu):
        control.observe(update, names="value")
    update()
    return Explorer([size, world, stage, precision, gpu, text, plot], "ZeRO memory explorer")
