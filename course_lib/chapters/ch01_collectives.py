"""Chapter 1: worker functions, the ring's schedule and the figures of the collectives notebook.

The notebook ``notebooks/01_collectives.ipynb`` runs these through
:func:`course_lib.launch.run_distributed`, which needs importable top-level functions.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from course_lib import collectives as C
from course_lib.launch import DistContext


def send_recv_worker(ctx: DistContext, numel: int) -> dict:
    """Chapter 1: rank 0 sends ``arange(numel)`` to rank 1 with blocking send/recv.

    Returns what each rank holds afterwards (rank 1 should hold rank 0's tensor).
    """
    x = torch.arange(numel, dtype=torch.float32) if ctx.rank == 0 else torch.zeros(numel)
    if ctx.rank == 0:
        dist.send(x, dst=1)
    elif ctx.rank == 1:
        dist.recv(x, src=0)
    return {"rank": ctx.rank, "tensor": x.tolist()}


def ping_pong_worker(ctx: DistContext, sizes: list[int], repeats: int) -> dict[int, float]:
    """Chapter 1: one-way time of a message, ``{n_bytes: median seconds}``, between ranks 0, 1.

    Rank 0 sends, rank 1 sends the same bytes back; half the round trip is one message.
    """
    torch.set_num_threads(1)
    out = {}
    for n_bytes in sizes:
        buf = torch.zeros(max(1, n_bytes // 4))  # (n_bytes / 4,) float32
        times = []
        for i in range(repeats + 1):  # the first round trip is a warm-up
            dist.barrier()
            start = time.perf_counter()
            if ctx.rank == 0:
                dist.send(buf, dst=1)
                dist.recv(buf, src=1)
            elif ctx.rank == 1:
                dist.recv(buf, src=0)
                dist.send(buf, dst=0)
            if i > 0:
                times.append((time.perf_counter() - start) / 2)
        out[n_bytes] = statistics.median(times)
    return out


def counter_worker(ctx: DistContext, numel: int, algorithms: list[str]) -> dict[str, dict]:
    """Chapter 1: per algorithm, this rank's CommCounter after one fp32 all-reduce of ``numel``.

    Also checks the result against ``dist.all_reduce`` (``max_abs_err``).
    """
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(ctx.rank)
    source = torch.randn(numel, generator=gen)  # (numel,) different on every rank
    expected = source.clone()
    dist.all_reduce(expected)
    out = {}
    for name in algorithms:
        counter = C.CommCounter()
        result = C.ALL_REDUCES[name](source.clone(), counter=counter)
        out[name] = {
            "bytes_sent": counter.bytes_sent,
            "bytes_received": counter.bytes_received,
            "messages_sent": counter.messages_sent,
            "max_abs_err": float((result - expected).abs().max()),
        }
    return out


def timing_worker(
    ctx: DistContext, sizes: list[int], algorithms: list[str], repeats: int
) -> dict[tuple[str, int], list[float]]:
    """Chapter 1: ``{(algorithm, n_bytes): [seconds per repeat]}`` of fp32 all-reduces.

    Algorithms are interleaved repeat by repeat after one warm-up; each timing starts after
    a barrier. ``"builtin"`` names ``dist.all_reduce`` (gloo's own), the yardstick.
    """
    torch.set_num_threads(1)
    fns = {name: C.ALL_REDUCES.get(name, dist.all_reduce) for name in algorithms}
    times: dict[tuple[str, int], list[float]] = {}
    for n_bytes in sizes:
        source = torch.randn(n_bytes // 4)  # (n_bytes / 4,) float32
        buffer = torch.empty_like(source)
        for i in range(repeats + 1):
            for name, fn in fns.items():
                buffer.copy_(source)
                dist.barrier()
                start = time.perf_counter()
                fn(buffer)
                if i > 0:
                    times.setdefault((name, n_bytes), []).append(time.perf_counter() - start)
    return times


def slowest_rank_medians(per_rank: list[dict]) -> dict:
    """Chapter 1: per key, the median over repeats of the slowest rank's time."""
    out = {}
    for key in per_rank[0]:
        slowest = [max(ts) for ts in zip(*(r[key] for r in per_rank), strict=True)]
        out[key] = statistics.median(slowest)
    return out


def ring_schedule(world_size: int) -> list[dict]:
    """Chapter 1: the ring all-reduce's 2(N - 1) steps, as :func:`ring_all_reduce` runs them.

    Each step is ``{"phase", "step", "sends": {rank: chunk}, "holds": [[set of ranks]]}``
    where ``holds[r][c]`` is the set of ranks whose contribution rank r's copy of chunk c
    contains *after* the step. The indices are the ones of ``course_lib.collectives``.
    """
    n = world_size
    holds = [[{r} for _ in range(n)] for r in range(n)]
    steps = [{"phase": "start", "step": 0, "sends": {}, "holds": [list(h) for h in holds]}]
    for s in range(n - 1):  # reduce-scatter: add the left neighbour's partial sum
        sends = {r: (r - s - 1) % n for r in range(n)}
        sent = {r: set(holds[r][c]) for r, c in sends.items()}
        for r in range(n):
            left = (r - 1) % n
            holds[r][sends[left]] = holds[r][sends[left]] | sent[left]
        steps.append(
            {
                "phase": "reduce-scatter",
                "step": s + 1,
                "sends": sends,
                "holds": [[set(x) for x in h] for h in holds],
            }
        )
    for s in range(n - 1):  # all-gather: overwrite with the finished chunk
        sends = {r: (r - s) % n for r in range(n)}
        sent = {r: set(holds[r][c]) for r, c in sends.items()}
        for r in range(n):
            left = (r - 1) % n
            holds[r][sends[left]] = sent[left]
        steps.append(
            {
                "phase": "all-gather",
                "step": s + 1,
                "sends": sends,
                "holds": [[set(x) for x in h] for h in holds],
            }
        )
    return steps


# ---------------------------------------------------------------------------------------
# Figures and tables of the notebook (matplotlib imported inside: the ranks never need it)

FONT = 11  # the smallest text of the chapter's figures, in points

# One line style per all-reduce: at N = 2 the model gives naive = tree and ring =
# halving-doubling, so coinciding lines must stay visible (dashes over a wide solid line).
MODEL_STYLE = {
    "naive_all_reduce": {"ls": "-", "lw": 5.0, "alpha": 0.35},
    "tree_all_reduce": {"ls": (0, (4, 3)), "lw": 1.8, "alpha": 1.0},
    "ring_all_reduce": {"ls": "-", "lw": 5.0, "alpha": 0.35},
    "halving_doubling_all_reduce": {"ls": (0, (1, 2)), "lw": 2.2, "alpha": 1.0},
}
MARKERS = {
    "naive_all_reduce": "o",
    "tree_all_reduce": "v",
    "ring_all_reduce": "s",
    "halving_doubling_all_reduce": "D",
    "builtin": "*",
}


def schedule_table(world_size: int) -> str:
    """Chapter 1: which chunk each rank sends in each step of :func:`ring_schedule`, as text."""
    steps = ring_schedule(world_size)[1:]
    head = f"{'phase':<15} {'step':>4}  " + " ".join(f"r{r} sends" for r in range(world_size))
    lines = [head]
    for st in steps:
        sends = " ".join(f"{'c' + str(st['sends'][r]):>8}" for r in range(world_size))
        lines.append(f"{st['phase']:<15} {st['step']:>4}  {sends}")
    return "\n".join(lines)


def plot_ring_schedule(world_size: int):
    """Chapter 1: one panel per step of the ring all-reduce; cells count contributions held.

    Row = rank, column = chunk; the number is how many ranks' inputs that copy holds
    (``world_size`` = finished, dark green); a red frame marks the chunk sent right.
    """
    import matplotlib.pyplot as plt

    n, schedule = world_size, ring_schedule(world_size)
    fig, axes = plt.subplots(1, len(schedule), figsize=(2.45 * len(schedule), 3.4))
    cmap = plt.get_cmap("YlGn")
    for ax, st in zip(axes, schedule, strict=True):
        for r in range(n):
            for c in range(n):
                k = len(st["holds"][r][c])
                ax.add_patch(plt.Rectangle((c, r), 1, 1, color=cmap(0.15 + 0.8 * k / n)))
                ink = "white" if k > n // 2 else "black"
                ax.text(c + 0.5, r + 0.5, str(k), ha="center", va="center", fontsize=FONT + 1,
                        color=ink)  # fmt: skip
                if st["sends"].get(r) == c:
                    ax.add_patch(plt.Rectangle((c, r), 1, 1, fill=False, ec="red", lw=2.5))
        ax.set_xlim(0, n)
        ax.set_ylim(n, 0)
        ax.set_xticks([c + 0.5 for c in range(n)], [f"c{c}" for c in range(n)], fontsize=FONT)
        ax.set_yticks([r + 0.5 for r in range(n)], [f"r{r}" for r in range(n)], fontsize=FONT)
        title = f"{st['phase']}\nstep {st['step']}" if st["sends"] else "start\n"
        ax.set_title(title, fontsize=FONT)
        ax.set_aspect("equal")
    fig.suptitle(
        f"Ring all-reduce, N = {n}: contributions each rank's copy of each chunk holds; "
        "red frame = chunk sent to the right",
        fontsize=FONT + 1,
    )
    fig.tight_layout()
    return fig


def plot_busiest_rank_bytes(counts: dict[int, list[dict]], n_bytes: int):
    """Chapter 1: bytes sent by the busiest rank / n, measured (markers) and the formulas."""
    import matplotlib.pyplot as plt

    from course_lib.viz.palette import PALETTE

    worlds = list(counts)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for algo, marker, color in [("naive_all_reduce", "o", "C1"), ("ring_all_reduce", "s", "C0")]:
        busiest = [max(r[algo]["bytes_sent"] for r in counts[w]) / n_bytes for w in worlds]
        ax.plot(worlds, busiest, marker, color=color, ms=9, label=f"{algo} (counted)")
    nn = list(range(2, 9))
    ax.plot(nn, [k - 1 for k in nn], ":", color=PALETTE["predicted"], label="naive: N - 1")
    ax.plot(nn, [2 * (k - 1) / k for k in nn], "--", color=PALETTE["predicted"],
            label="ring: 2(N - 1)/N")  # fmt: skip
    ax.set_xlabel("ranks N", fontsize=FONT)
    ax.set_ylabel("bytes sent by the busiest rank / n", fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    ax.set_title("The root's traffic grows with N; the ring's does not", fontsize=FONT + 1)
    ax.legend(fontsize=FONT - 1)
    fig.tight_layout()
    return fig


def plot_all_reduce_times(
    medians: dict, sizes: list[int], names: list[str], world_size: int, alpha: float, beta: float
):
    """Chapter 1: measured all-reduce times (markers) beside the alpha-beta model (lines).

    Every algorithm has its own marker and colour; model lines have their own style
    (:data:`MODEL_STYLE`), so two algorithms with the same model at this N stay visible.
    ``"builtin"`` (gloo's own) is measured only.
    """
    import matplotlib.pyplot as plt
    import numpy as np

    from course_lib.cost import comm_model as M

    fig, ax = plt.subplots(figsize=(8.5, 7))
    fine = np.geomspace(min(sizes), max(sizes), 60)
    for i, name in enumerate(names):
        color = f"C{i}"
        times = [medians[(name, s)] for s in sizes]
        label = "builtin (gloo), measured" if name == "builtin" else f"{name}, measured"
        ax.loglog(sizes, times, MARKERS.get(name, "o"), color=color, ms=8, label=label)
        if name in MODEL_STYLE:
            pred = [M.predict(name, s, world_size, alpha, beta) for s in fine]
            ax.loglog(fine, pred, color=color, label=f"{name}, model", **MODEL_STYLE[name])
    ax.set_xlabel("tensor size n (bytes)", fontsize=FONT)
    ax.set_ylabel("seconds (median of the slowest rank)", fontsize=FONT)
    ax.tick_params(labelsize=FONT)
    ax.set_title(
        f"All-reduce at N = {world_size}: measured (markers) vs alpha-beta model (lines,\n"
        "fitted to the ring only; at N = 2 naive = tree and ring = halving-doubling)",
        fontsize=FONT,
    )
    ax.legend(fontsize=FONT - 1, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.14))
    fig.tight_layout()
    return fig
