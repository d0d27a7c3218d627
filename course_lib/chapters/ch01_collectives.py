"""Chapter 1: worker functions and the ring's schedule for the collectives notebook.

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
