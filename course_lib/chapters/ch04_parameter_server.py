"""Chapter 4: worker functions for the parameter-server notebook and benchmark.

Spawned ranks import workers by name, so they live here. Each experiment runs several
configurations in one spawn, with a barrier between them: a free-running fast worker must
not push into the next configuration's rounds.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from course_lib import collectives as C
from course_lib.cost import comm_model as M
from course_lib.data import ByteDataset, get_batch
from course_lib.launch import DistContext
from course_lib.model import GPTConfig, loss_fn
from course_lib.parallel.parameter_server import (
    HEADER,
    PARAMS,
    PUSH,
    ParameterServer,
    PSConfig,
    flat_of,
    message,
    sync_round,
    unflat_into,
)
from course_lib.train import TrainConfig, build_model, lr_at, train


def worked_example_worker(ctx: DistContext, theta: list[float], data: list, lr: float) -> dict:
    """Chapter 4: one synchronous step of a 2-parameter model ``y = w x + b`` by hand.

    Rank 0 is the server holding ``theta = [w, b]``; worker ``i`` (rank i + 1) computes the
    gradient of its mean squared error on ``data[i]`` (a list of ``(x, y)``) with autograd,
    pushes it, and receives the server's reply from :func:`sync_round`.
    """
    torch.set_num_threads(1)
    workers = list(range(1, ctx.world_size))
    if ctx.rank == 0:
        shard = torch.tensor(theta)
        pushes = sync_round(shard, workers, lr)
        return {"pushes": pushes, "theta": shard}
    params = torch.tensor(theta, requires_grad=True)
    xy = torch.tensor(data[ctx.rank - 1])  # (n, 2): columns x, y
    loss = ((params[0] * xy[:, 0] + params[1] - xy[:, 1]) ** 2).mean()
    loss.backward()
    dist.send(message([0, 0, 0, loss.item()], params.grad), dst=0, tag=PUSH)
    reply = torch.empty(HEADER + 2)
    dist.recv(reply, src=0, tag=PARAMS)
    return {"grad": params.grad, "loss": loss.item(), "theta": reply[HEADER:]}


def free_run_worker(
    ctx: DistContext,
    model_config: GPTConfig,
    train_config: TrainConfig,
    dataset: ByteDataset,
    configs: list[dict],
    n_grads: int,
    every: int,
) -> list[dict] | None:
    """Chapter 4: each ``PSConfig(**kw)`` of ``configs`` free running for ``n_grads``.

    The server (rank 0) returns per configuration the snapshots of
    :meth:`ParameterServer.run_for`, the staleness log and the bytes through its link.
    """
    torch.set_num_threads(1)
    out = []
    for kw in configs:
        strategy = ParameterServer(ctx, PSConfig(**kw))
        strategy.setup(model_config, train_config, "cpu")
        dist.barrier()
        start = time.perf_counter()
        snaps = strategy.run_for(n_grads, dataset.train, every)
        wall = time.perf_counter() - start
        dist.barrier()
        c = strategy.counter
        out.append({"snaps": snaps, "log": strategy.staleness_log, "wall_s": wall,
                    "server_bytes": c.bytes_sent + c.bytes_received})  # fmt: skip
    return out if ctx.rank == 0 else None


def allreduce_worker(
    ctx: DistContext,
    model_config: GPTConfig,
    train_config: TrainConfig,
    dataset: ByteDataset,
    slowdowns: list[float],
    n_grads: int,
    every: int,
    delay_s: float = 0.0,
) -> list[dict] | None:
    """Chapter 4's yardstick: data-parallel SGD whose gradients meet in a ring all-reduce
    (:func:`course_lib.collectives.ring_all_reduce`, counted); rank 0 slowed by each factor
    of ``slowdowns`` in turn, ``delay_s`` of simulated compute per step as in
    :class:`~course_lib.parallel.parameter_server.PSConfig`. Rank 0 returns snapshots as
    ``run_for``."""
    torch.set_num_threads(1)
    cfg, n, out = train_config, ctx.world_size, []
    for slowdown in slowdowns:
        model = build_model(model_config, cfg.seed, "cpu")
        params = [p for p in model.parameters() if p.requires_grad]
        counter, flat = C.CommCounter(), flat_of(params)  # (P,)
        dist.barrier()
        start, snaps = time.perf_counter(), [(0.0, 0, flat.clone())]
        for step in range(-(-n_grads // n)):
            t0 = time.perf_counter()
            x, y = get_batch(
                dataset.train, cfg.batch_size, cfg.seq_len, cfg.seed, step, ctx.rank, n
            )
            model.zero_grad()
            loss_fn(model(x), y).backward()
            step_s = time.perf_counter() - t0 + delay_s
            time.sleep(delay_s + (slowdown - 1) * step_s * (ctx.rank == 0))
            grad = flat_of([p.grad for p in params])  # (P,)
            C.ring_all_reduce(grad, counter=counter)
            with torch.no_grad():
                flat.add_(grad / n, alpha=-lr_at(step, cfg))
                unflat_into(flat, params)
            if ((step + 1) * n) % every == 0:
                snaps.append((time.perf_counter() - start, (step + 1) * n, flat.clone()))
        wall = time.perf_counter() - start
        dist.barrier()
        out.append({"snaps": snaps, "wall_s": wall, "rank_bytes": counter.bytes_sent})
    return out if ctx.rank == 0 else None


def gradient_bytes(n_params: float, dtype: torch.dtype = torch.bfloat16) -> float:
    """Chapter 4: bytes of one full gradient (or one copy of the parameters) of
    ``n_params`` elements in ``dtype``: ``n_params x bytes per element``.

    bf16 has 2 bytes per element, fp32 4: a 1B-parameter bf16 gradient is 2e9 bytes.
    """
    return n_params * dtype.itemsize


def server_link_bytes(n_bytes: int, n_workers: int, header_bytes: int = 4 * HEADER) -> dict:
    """Chapter 4: bytes through a single server's link per synchronous step, per direction.

    ``"in"``: the W pushes (``n_bytes`` of gradient + header each); ``"out"``: the W
    PARAMS replies (``n_bytes`` of parameters + header each). Each direction carries
    ``W (n + header)``, growing with W.
    """
    one = n_bytes + header_bytes
    return {"in": n_workers * one, "out": n_workers * one}


def ring_rank_bytes(n_bytes: int, n_workers: int, rank: int = 0, element_size: int = 4) -> dict:
    """Chapter 4: bytes group rank ``rank`` sends (``"out"``) and receives (``"in"``) in a
    ring all-reduce of ``n_bytes`` among ``n_workers`` ranks: about ``2(W-1)/W n`` each way
    (exactly that when W divides the element count; rank r receives what rank r-1 sends)."""
    if n_workers == 1:
        return {"in": 0, "out": 0}
    sent = M.bytes_sent_per_rank("ring_all_reduce", n_bytes, n_workers, rank,
                                 element_size=element_size)  # fmt: skip
    left = (rank - 1) % n_workers
    received = M.bytes_sent_per_rank("ring_all_reduce", n_bytes, n_workers, left,
                                     element_size=element_size)  # fmt: skip
    return {"in": received, "out": sent}


def bytes_worker(ctx: DistContext, model_config: GPTConfig, train_config: TrainConfig,
                 dataset: ByteDataset, steps: int) -> dict | None:  # fmt: skip
    """Chapter 4: counted bytes per step, each direction, through the server's link (1 server
    + N workers, sync) and through one rank of a ring all-reduce of the same gradient among
    the N workers.

    Rank 0 (the server) returns ``server_in``/``server_out`` per step (and their sum,
    ``server_bytes``); rank 1 (the ring's group rank 0) returns ``rank_sent`` and
    ``rank_received`` (``rank_bytes`` = sent).
    """
    torch.set_num_threads(1)
    strategy = ParameterServer(ctx, PSConfig())
    strategy.setup(model_config, train_config, "cpu")
    strategy.run_for(steps * len(strategy.workers), dataset.train, every=10**9)
    workers = dist.new_group(strategy.workers)  # every rank calls new_group
    counter = C.CommCounter()  # what this rank's ring all-reduce sends and receives
    if not strategy.is_server:
        grad = flat_of([p.grad for p in strategy.params])  # (P,)
        C.ring_all_reduce(grad, group=workers, counter=counter)
    dist.barrier()
    c = strategy.counter  # the server's: every push it received, every reply it sent
    if ctx.rank == 0:
        n_params = sum(p.numel() for p in strategy.params)
        server_in, server_out = c.bytes_received // steps, c.bytes_sent // steps
        return {"server_in": server_in, "server_out": server_out,
                "server_bytes": server_in + server_out, "n_params": n_params}  # fmt: skip
    if ctx.rank == 1:
        return {"rank_sent": counter.bytes_sent, "rank_received": counter.bytes_received,
                "rank_bytes": counter.bytes_sent}  # fmt: skip
    return None


@torch.no_grad()
def val_curve(
    model_config: GPTConfig, train_config: TrainConfig, dataset: ByteDataset, snaps: list
) -> list[tuple[float, int, float]]:
    """Chapter 4: ``(seconds, gradients applied, validation loss)`` of each snapshot."""
    cfg = train_config
    model = build_model(model_config, cfg.seed, "cpu").eval()
    params = [p for p in model.parameters() if p.requires_grad]
    batches = [get_batch(dataset.val, cfg.batch_size, cfg.seq_len, cfg.seed, i)
               for i in range(cfg.eval_batches)]  # fmt: skip
    out = []
    for seconds, grads, flat in snaps:
        unflat_into(flat, params)
        loss = sum(loss_fn(model(x), y).item() for x, y in batches) / len(batches)
        out.append((seconds, grads, loss))
    return out


def staleness_histogram(log: list[tuple[int, int, int, int]], top: int = 8) -> list[int]:
    """Chapter 4: counts of staleness 0, 1, ..., ``top`` (the last bin holds ``>= top``)."""
    counts = [0] * (top + 1)
    for _, _, s, _ in log:
        counts[min(s, top)] += 1
    return counts


def time_to(curve: list[tuple[float, int, float]], target: float) -> float | None:
    """Chapter 4: seconds until the validation loss first reaches ``target`` (None: never)."""
    return next((t for t, _, v in curve if v <= target), None)


def summarize(curve: list, log: list | None, wall_s: float, n_grads: int) -> dict[str, Any]:
    """Chapter 4: one row of the comparison: gradients/s, final loss, staleness."""
    stale = [s for _, _, s, _ in log] if log else [0]
    return {"grads_per_s": n_grads / wall_s, "final_val": curve[-1][2],
            "max_stale": max(stale), "mean_stale": sum(stale) / len(stale)}  # fmt: skip


def train_ps_worker(ctx: DistContext, configs: list[dict], **train_kwargs: Any) -> list | None:
    """Chapter 4: :func:`course_lib.train.train` with ``ParameterServer(ctx, PSConfig(**kw))``
    for each ``kw`` of ``configs`` in turn.

    Rank 0 (server 0) returns, per configuration, the metrics, the final parameters and
    the staleness log.
    """
    torch.set_num_threads(1)
    out = []
    for kw in configs:
        strategy = ParameterServer(ctx, PSConfig(**kw))
        result = train(strategy=strategy, **train_kwargs)
        state = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
        out.append({"metrics": result.metrics, "state": state, "log": strategy.staleness_log})
    return out if ctx.rank == 0 else None
