"""Chapter 2: worker functions and figures for the data-parallel notebook.

The notebook ``notebooks/02_data_parallel.ipynb`` runs these through
:func:`course_lib.launch.run_distributed`, which needs importable top-level functions.
Every worker builds the course's reference GPT from a seed, draws its slice of the global
batch with :func:`course_lib.data.get_batch` and wraps the model in
:class:`course_lib.parallel.data_parallel.DataParallel`.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist

from course_lib import collectives as C
from course_lib.data import get_batch, load_text, make_dataset
from course_lib.launch import DistContext
from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel.common import global_mean
from course_lib.parallel.data_parallel import DataParallel
from course_lib.train import build_model

SEED = 1337  # model init and batches
SEQ_LEN = 64  # tokens per sequence: the tiny model's block size


def _train_data() -> torch.Tensor:
    """The embedded corpus' training split, as byte ids."""
    return make_dataset(load_text(None)).split("train")


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    """All tensors as one flat fp32 vector (for cross-rank comparisons)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _ranks_bitwise_equal(flat: torch.Tensor) -> bool:
    """True when every rank holds exactly the same ``flat`` tensor."""
    everyone = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return all(torch.equal(t, everyone[0]) for t in everyone)


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest absolute elementwise difference between two lists of tensors."""
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b, strict=True))


def equivalence_worker(
    ctx: DistContext, modes: list[str], steps: int, batch_size: int, bucket_cap_mb: float
) -> dict[str, dict[str, Any]]:
    """Chapter 2: train DataParallel and, beside it, the single-device reference; compare.

    Every rank starts from a *different* random init (seed + rank): the wrap's broadcast
    must make them all rank 0's. The reference sees the whole global batch of
    ``batch_size`` sequences; both use SGD(lr=0.1, momentum=0.9). Per mode: the largest gradient
    difference at step 0, the largest parameter difference after each step, whether the
    ranks' parameters are bitwise equal at the end, and the last global mean loss.
    """
    data, cfg = _train_data(), GPTConfig()
    out = {}
    for mode in modes:
        ref = build_model(cfg, SEED, "cpu")  # rank 0's init, on one device
        module = build_model(cfg, SEED + ctx.rank, "cpu")  # a different init on every rank
        model = DataParallel(module, mode=mode, bucket_cap_mb=bucket_cap_mb)
        opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
        diffs, grad_diff = [], None
        for step in range(steps):
            x, y = get_batch(data, batch_size, SEQ_LEN, SEED, step, ctx.rank, ctx.world_size)
            loss = loss_fn(model(x), y)  # (b, T) slice of this rank
            opt.zero_grad(set_to_none=True)
            loss.backward()
            model.finish_gradient_synchronization()
            xg, yg = get_batch(data, batch_size, SEQ_LEN, SEED, step)  # (B, T) global batch
            ref_loss = loss_fn(ref(xg), yg)
            ref_opt.zero_grad(set_to_none=True)
            ref_loss.backward()
            if step == 0:
                grad_diff = _max_diff(
                    [p.grad for p in module.parameters()], [p.grad for p in ref.parameters()]
                )
            opt.step()
            ref_opt.step()
            diffs.append(_max_diff(list(module.parameters()), list(ref.parameters())))
        out[mode] = {
            "grad_diff_step0": grad_diff,
            "param_diff_per_step": diffs,
            "ranks_bitwise_equal": _ranks_bitwise_equal(_flat(list(module.parameters()))),
            "loss": global_mean(loss, model.group),
            "ref_loss": ref_loss.item(),
        }
    return out


def accumulation_worker(
    ctx: DistContext, micro_batches: int, batch_size: int
) -> dict[str, float | int]:
    """Chapter 2: ``micro_batches`` backward passes, all but the last inside ``no_sync()``.

    The global batch of ``batch_size`` sequences is cut over ranks, then each rank's share
    into ``micro_batches`` micro-batches whose losses are scaled by 1/micro_batches.
    Returns the largest difference from the single-device gradient of the whole batch and
    the all-reduce calls and bytes the accumulated step cost.
    """
    data, cfg = _train_data(), GPTConfig()
    module = build_model(cfg, SEED, "cpu")
    model = DataParallel(module, mode="overlapped", bucket_cap_mb=1.0)
    x, y = get_batch(data, batch_size, SEQ_LEN, SEED, 0, ctx.rank, ctx.world_size)  # (b, T)
    model.reset_counters()
    for k, (xm, ym) in enumerate(zip(x.chunk(micro_batches), y.chunk(micro_batches), strict=True)):
        last = k == micro_batches - 1
        with model.no_sync() if not last else contextlib.nullcontext():
            loss = loss_fn(model(xm), ym)  # (b / micro_batches, T) micro-batch
            (loss / micro_batches).backward()
    model.finish_gradient_synchronization()
    ref = build_model(cfg, SEED, "cpu")
    xg, yg = get_batch(data, batch_size, SEQ_LEN, SEED, 0)  # (B, T) the whole global batch
    ref_loss = loss_fn(ref(xg), yg)
    ref_loss.backward()
    grads, ref_grads = [p.grad for p in module.parameters()], [p.grad for p in ref.parameters()]
    return {
        "grad_diff": _max_diff(grads, ref_grads),
        "all_reduce_calls": model.all_reduce_calls,
        "bytes_all_reduced": model.bytes_all_reduced,
        "n_buckets": len(model.buckets),
    }


def ring_bytes_worker(ctx: DistContext, modes: list[str], bucket_cap_mb: float) -> dict:
    """Chapter 2: bytes this rank sends in one synchronization with chapter 1's ring.

    ``DataParallel(ring=True)`` all-reduces with :func:`collectives.ring_all_reduce` and
    counts in a :class:`collectives.CommCounter`. Per mode: the gradient payload handed to
    all-reduce, the calls, the bytes and messages this rank sent, and each call's size.
    """
    data, cfg = _train_data(), GPTConfig()
    out = {}
    for mode in modes:
        counter = C.CommCounter()
        module = build_model(cfg, SEED, "cpu")
        model = DataParallel(module, mode, bucket_cap_mb, ring=True, counter=counter)
        x, y = get_batch(data, 2 * ctx.world_size, SEQ_LEN, SEED, 0, ctx.rank, ctx.world_size)
        loss_fn(model(x), y).backward()
        model.finish_gradient_synchronization()
        sizes = (
            [p.numel() * p.element_size() for p in model.params]
            if mode == "naive"
            else [k.nbytes for k in model.buckets]
        )
        out[mode] = {
            "payload": model.bytes_all_reduced,
            "calls": model.all_reduce_calls,
            "bytes_sent": counter.bytes_sent,
            "messages_sent": counter.messages_sent,
            "sizes": sizes,
        }
    return out


def _timed_step(model: DataParallel, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """One forward, backward and gradient synchronization, timed after a barrier.

    Times are seconds from the step's start: ``forward``, ``backward`` (compute, plus the
    hooks' launches in overlapped mode), ``sync`` (``finish_gradient_synchronization``).
    """
    for p in model.module.parameters():
        p.grad = None
    model.reset_counters()
    model.timeline = []
    dist.barrier()
    t0 = time.perf_counter()
    loss = loss_fn(model(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    model.finish_gradient_synchronization()
    t3 = time.perf_counter()
    timeline = [
        {**row, "start": row["start"] - t0, "end": (row["end"] or t3) - t0}
        for row in model.timeline
    ]
    return {
        "forward": t1 - t0,
        "backward": t2 - t1,
        "sync": t3 - t2,
        "step": t3 - t0,
        "backward_span": (t1 - t0, t2 - t0),
        "timeline": timeline,
        "calls": model.all_reduce_calls,
        "bytes": model.bytes_all_reduced,
    }


def step_timing_worker(
    ctx: DistContext,
    configs: list[tuple[str, float]],
    batch_per_rank: list[int],
    repeats: int,
) -> dict[str, Any]:
    """Chapter 2: time forward, backward and sync for each ``(mode, bucket_cap_mb)``.

    For each config and each per-rank batch size ``b``: one warm-up step, then
    ``repeats`` timed steps (configs interleaved repeat by repeat, so that load drift hits
    them alike). Returns ``times[(mode, cap, b, what)] = [seconds per repeat]`` with
    ``what`` in forward/backward/sync/step, ``info[(mode, cap)]`` (all-reduce calls and
    bytes per step, bucket sizes) and ``timelines[(mode, cap, b)]`` (the last repeat's).
    """
    data, cfg = _train_data(), GPTConfig()
    models = {}
    for mode, cap in configs:
        models[(mode, cap)] = DataParallel(build_model(cfg, SEED, "cpu"), mode, cap)
    times: dict[tuple, list[float]] = {}
    info, timelines = {}, {}
    for b in batch_per_rank:
        for i in range(repeats + 1):
            global_batch = b * ctx.world_size
            x, y = get_batch(data, global_batch, SEQ_LEN, SEED, i, ctx.rank, ctx.world_size)
            for (mode, cap), model in models.items():
                row = _timed_step(model, x, y)
                if i == 0:
                    continue  # warm-up
                for what in ("forward", "backward", "sync", "step"):
                    times.setdefault((mode, cap, b, what), []).append(row[what])
                sizes = [k.nbytes for k in model.buckets]
                info[(mode, cap)] = {"calls": row["calls"], "bytes": row["bytes"], "buckets": sizes}
                timelines[(mode, cap, b)] = {
                    "backward_span": row["backward_span"],
                    "step": row["step"],
                    "buckets": row["timeline"],
                }
    return {"times": times, "info": info, "timelines": timelines}


def slowest_rank(
    per_rank: list[dict[tuple, list[float]]], stat: str = "min", across: str = "max"
) -> dict[tuple, float]:
    """Chapter 2: per key, ``stat`` ("min" or "median") over repeats of one rank's time.

    A repeat takes as long as its slowest rank (``across="max"``). On a machine shared
    with other jobs the fastest repeat ("min") is the least disturbed one: the best
    estimate of the cost itself. ``across="min"`` takes the rank that waited least: for
    the synchronization, the rank that finished backward last, whose sync time is pure
    communication (the others' includes waiting for it).
    """
    reduce = {"min": min, "median": statistics.median}[stat]
    pick = {"max": max, "min": min}[across]
    out = {}
    for key in per_rank[0]:
        series = zip(*(r[key] for r in per_rank), strict=True)
        out[key] = reduce([pick(ts) for ts in series])
    return out


def parameter_bytes(config: GPTConfig | None = None) -> int:
    """Chapter 2: bytes of the fp32 gradients DP all-reduces each step (tied weights once)."""
    model = GPT(config or GPTConfig())
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def plot_overlap_timeline(timelines: dict[str, list[dict[str, Any]]], title: str) -> plt.Figure:
    """Chapter 2: one panel per run: each rank's backward (grey) vs each bucket's all-reduce.

    ``timelines`` maps a label to the per-rank timelines of one step, as
    :func:`step_timing_worker` returns them (times from each rank's start of the step,
    which a barrier aligns). A bucket's bar spans from its all-reduce's launch (the tick)
    to its completion on that rank: a rank that launches first waits for the others, so
    its bar is long; the last one to launch finds the others ready. The dashed lines end
    the step (gradients averaged and in ``p.grad``).
    """
    n = len(timelines)
    n_buckets = max(len(tl["buckets"]) for tls in timelines.values() for tl in tls)
    fig, axes = plt.subplots(n, 1, figsize=(8.5, 0.8 + n * (0.9 + 0.32 * n_buckets)), sharex=True)
    axes = [axes] if n == 1 else list(axes)
    for ax, (label, per_rank) in zip(axes, timelines.items(), strict=True):
        shift = 0.4 / len(per_rank)
        for rank, tl in enumerate(per_rank):
            dy, color = (rank - (len(per_rank) - 1) / 2) * shift, f"C{rank}"
            start, end = tl["backward_span"]
            ax.barh(-1 + dy, (end - start) * 1e3, left=start * 1e3, height=shift, color="0.6")
            for row in tl["buckets"]:
                y, width = row["bucket"] + dy, max(row["end"] - row["start"], 3e-4) * 1e3
                ax.barh(y, width, left=row["start"] * 1e3, height=shift, color=color)
                ax.plot(row["start"] * 1e3, y, "|", color="k", ms=6)
            ax.axvline(tl["step"] * 1e3, color=color, ls="--", lw=1, label=f"rank {rank}")
        ax.set_yticks(
            range(-1, n_buckets), ["backward", *[f"bucket {k}" for k in range(n_buckets)]]
        )
        ax.tick_params(axis="y", labelsize=7)
        ax.invert_yaxis()
        steps = ", ".join(f"{tl['step'] * 1e3:.1f}" for tl in per_rank)
        ax.set_title(f"{label}: step {steps} ms (rank 0, 1, ...)", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    axes[-1].set_xlabel("ms since the start of the step (each rank's clock)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
