"""Chapter 7's explorer: model size, GPUs, memory per GPU, global batch -> ranked plans.

:func:`planner_explorer` is built like chapter 5's ``pipeline_explorer``: ipywidgets
controls, an HTML table of the best configurations and the figure as PNG bytes in an
``Image``, returned as an :class:`~course_lib.viz.widgets.Explorer` whose ``children`` a
test can drive without a browser. It calls :func:`course_lib.cost.planner.plan` on DGX
H100 nodes (:data:`course_lib.cost.clusters.H100_CLUSTER`) with the chosen memory per
GPU; when nothing fits it shows the planner's ``ValueError`` (the closest miss and why).
The book has no kernel: its static twin is :func:`course_lib.viz.plots_hybrid.plan_figure`
with :func:`plan_html`'s table.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import io

import ipywidgets as w

from course_lib.cost import planner
from course_lib.cost.clusters import H100_CLUSTER, Cluster
from course_lib.model import GPTConfig
from course_lib.viz.plots_hybrid import plan_figure
from course_lib.viz.widgets import Explorer

GIB = 2**30
SEQ = 2048  # tokens per sequence in every preset


def _gpt(n_layer: int, n_embd: int, n_head: int) -> GPTConfig:
    return GPTConfig(
        vocab_size=51200, block_size=SEQ, n_layer=n_layer, n_head=n_head, n_embd=n_embd
    )


# GPT-3's shapes (Brown et al. 2020, Table 2.1) with Megatron's 51,200-token vocabulary.
MODELS: dict[str, GPTConfig] = {
    "1.3B (24 x 2048)": _gpt(24, 2048, 16),
    "6.7B (32 x 4096)": _gpt(32, 4096, 32),
    "13B (40 x 5120)": _gpt(40, 5120, 40),
    "30B (48 x 7168)": _gpt(48, 7168, 56),
    "175B (96 x 12288)": _gpt(96, 12288, 96),
}
GPU_COUNTS = (8, 16, 32, 64, 128, 256, 512, 1024)
MEMORY_GIB = (24, 40, 80, 141)  # RTX 4090, A100 40GB, H100 80GB, H200
BATCHES = (16, 32, 64, 128, 256, 512, 1024, 2048)  # global batch, sequences of SEQ tokens


def cluster_with_memory(memory_gib: float, base: Cluster = H100_CLUSTER) -> Cluster:
    """Chapter 7: ``base`` with ``memory_gib`` GiB per GPU (the explorer's memory control)."""
    return dataclasses.replace(
        base, name=f"{base.name}, {memory_gib:g} GiB per GPU", memory_bytes=int(memory_gib * GIB)
    )


def plan_html(table: planner.PlanTable, rows: int = 8) -> str:
    """Chapter 7: the best ``rows`` plans as an HTML table, and the rejections by kind."""
    head = "".join(
        f"<th>{h}</th>"
        for h in ("#", "configuration", "GiB/GPU", "step s", "bubble", "MFU", "tokens/s")
    )
    body = []
    for i, p in enumerate(table.plans[:rows], 1):
        cells = (
            i,
            p.choice.label(),
            f"{p.memory['total'] / GIB:.1f}",
            f"{p.time['step']:.3g}",
            f"{p.time['bubble_fraction']:.0%}",
            f"{p.mfu:.1%}",
            f"{p.tokens_per_s:,.0f}",
        )
        body.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>")
    kinds = collections.Counter(r.kind for r in table.rejected)
    why = ", ".join(f"{n} {k}" for k, n in kinds.most_common())
    return (
        f"<b>{len(table.plans)} configurations fit</b>, {len(table.rejected)} rejected "
        f"({html.escape(why)})<table><tr>{head}</tr>{''.join(body)}</table>"
    )


def planner_explorer(
    model: str = "13B (40 x 5120)",
    n_gpus: int = 64,
    memory_gib: float = 80,
    batch: int = 256,
    rows: int = 8,
) -> Explorer:
    """Chapter 7: controls model x GPUs x memory x batch -> the planner's ranked table, bars.

    Children, in order: model, GPUs, memory (GiB), global batch, the HTML text, the PNG
    image. Sequences are :data:`SEQ` tokens; the cluster is DGX H100 nodes (8 GPUs on
    NVLink 4, InfiniBand NDR between nodes) at the planner's default MFU of 0.4.
    """
    pick = w.Dropdown(options=list(MODELS), value=model, description="model")
    gpus = w.SelectionSlider(options=list(GPU_COUNTS), value=n_gpus, description="GPUs")
    memory = w.SelectionSlider(options=list(MEMORY_GIB), value=memory_gib, description="GiB/GPU")
    global_batch = w.SelectionSlider(options=list(BATCHES), value=batch, description="batch")
    text, plot = w.HTML(), w.Image(format="png")

    def update(*_: object) -> None:
        cluster = cluster_with_memory(memory.value)
        try:
            table = planner.plan(MODELS[pick.value], cluster, gpus.value, global_batch.value, SEQ)
        except ValueError as error:
            text.value = f"<b>nothing fits:</b> {html.escape(str(error))}"
            plot.value = b""
            return
        text.value = plan_html(table, rows)
        fig = plan_figure(
            table.plans[:rows],
            cluster.memory_bytes,
            title=f"{pick.value}, {gpus.value} GPUs, batch {global_batch.value}",
        )
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=80)
        plot.value = png.getvalue()

    for control in (pick, gpus, memory, global_batch):
        control.observe(update, names="value")
    update()
    return Explorer([pick, gpus, memory, global_batch, text, plot], "3D parallelism planner")
