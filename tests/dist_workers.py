"""Worker functions for the launch tests; spawned ranks import them by name from here."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed as dist

from course_lib.launch import DistContext


def sum_of_ranks(ctx: DistContext) -> dict[str, Any]:
    """All-reduce rank + 1; report the sum and what the rank knows about itself."""
    x = torch.tensor([float(ctx.rank + 1)], device=ctx.device)
    dist.all_reduce(x)
    return {
        "total": x.item(),
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "local_rank": ctx.local_rank,
        "device": str(ctx.device),
        "backend": ctx.backend,
        "is_main": ctx.is_main(),
        "threads": torch.get_num_threads(),
        "dist_rank": dist.get_rank(),
    }


def echo(ctx: DistContext, *args: Any, **kwargs: Any) -> tuple[int, tuple, dict]:
    """Return the arguments as received, with the rank."""
    return ctx.rank, args, kwargs


def raise_on_rank_1(ctx: DistContext) -> None:
    """Rank 1 raises while rank 0 waits for a message that never comes."""
    if ctx.rank == 1:
        time.sleep(0.2)
        raise ValueError(f"rank 1 refuses to send at t={time.time():.3f}")  # in the report
    dist.recv(torch.zeros(1), src=1)


def exit_on_rank_1(ctx: DistContext, code: int) -> None:
    """Rank 1 leaves with ``os._exit(code)``, no traceback; rank 0 waits for it."""
    if ctx.rank == 1:
        time.sleep(0.2)
        os._exit(code)
    dist.recv(torch.zeros(1), src=1)


def abort_on_rank_1(ctx: DistContext) -> None:
    """Rank 1 dies by SIGABRT; rank 0 waits for it."""
    if ctx.rank == 1:
        time.sleep(0.2)
        os.abort()
    dist.recv(torch.zeros(1), src=1)


def mismatched_all_reduce(ctx: DistContext) -> None:
    """Rank 0 all-reduces 4 floats, rank 1 eight: a collective size mismatch."""
    dist.all_reduce(torch.ones(4 if ctx.rank == 0 else 8))


def hang_in_recv(ctx: DistContext) -> None:
    """Every rank waits for a message nobody sends."""
    dist.recv(torch.zeros(1), src=(ctx.rank + 1) % ctx.world_size)


def sleep_then_sum(ctx: DistContext, seconds: float) -> float:
    """Sleep, then all-reduce rank + 1 (a slow but correct worker)."""
    time.sleep(seconds)
    x = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(x)
    return x.item()


def return_without_result(ctx: DistContext) -> None:
    """Rank 0 leaves with ``os._exit(0)`` before returning."""
    if ctx.rank == 0:
        os._exit(0)


def torchrun_sum(ctx: DistContext) -> tuple[int, float]:
    """The torchrun test's worker: all-reduce rank + 1, return (rank, sum)."""
    x = torch.tensor([float(ctx.rank + 1)], device=ctx.device)
    dist.all_reduce(x)
    return ctx.rank, x.item()


def fail_on_last_rank(ctx: DistContext, mode: str) -> None:
    """The last rank fails by ``mode`` (raise, exit, abort); the others wait for it."""
    last = ctx.world_size - 1
    if ctx.rank == last:
        time.sleep(0.2)
        if mode == "raise":
            raise RuntimeError(f"rank {last} fails on purpose")
        if mode == "exit":
            os._exit(3)
        os.abort()
    dist.recv(torch.zeros(1), src=last)


def hang_at_any_size(ctx: DistContext) -> None:
    """Wait for a message nobody sends (alone, a rank just sleeps: it has no peer)."""
    if ctx.world_size == 1:
        time.sleep(3600)
    dist.recv(torch.zeros(1), src=(ctx.rank + 1) % ctx.world_size)
