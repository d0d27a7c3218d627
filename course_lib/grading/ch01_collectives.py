"""Chapter 1's grader: the learner's ring all-reduce / all-gather against torch's, on real ranks."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from course_lib.grading.core import import_learner, stub_error
from course_lib.launch import RankError, run_distributed


def _rank_input(rank: int, numel: int, shape, dtype) -> torch.Tensor:
    """A deterministic, rank-dependent input."""
    gen = torch.Generator().manual_seed(1000 + rank)
    values = torch.randint(-9, 10, (numel,), generator=gen).to(dtype)
    return values.reshape(shape) if shape is not None else values


def _own_chunk_only(tensor: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """All-gather input: zero every ``tensor_split`` chunk except this rank's own."""
    for c, chunk in enumerate(torch.tensor_split(tensor.view(-1), world_size)):
        if c != rank:
            chunk.zero_()
    return tensor


def _all_reduce_worker(ctx, cwd, module_name, fn_name, numel, shape, dtype, gather=False):
    """Runs on each rank: the learner's function and torch's all_reduce on the same input.

    With ``gather``, each rank holds only its own chunk, so the all-reduce (sum) of the
    inputs is exactly what an all-gather must produce.
    """
    fn = getattr(import_learner(cwd, module_name), fn_name)
    mine = _rank_input(ctx.rank, numel, shape, dtype)
    if gather:
        _own_chunk_only(mine, ctx.rank, ctx.world_size)
    ref = mine.clone()
    fn(mine)
    dist.all_reduce(ref)
    return mine.cpu(), ref.cpu()


def grade_all_reduce(
    module_name, fn_name, world_size=3, numel=10, shape=None, dtype=torch.float32, gather=False
):
    """Check ``module_name.fn_name`` against torch's all_reduce (sum) on ``world_size`` ranks.

    Chapter 1's graded exercise. ``gather=True`` grades an in-place ring all-gather: each
    rank starts with only its own ``tensor_split`` chunk filled.
    """
    try:
        results = run_distributed(
            _all_reduce_worker,
            world_size,
            os.getcwd(),
            module_name,
            fn_name,
            numel,
            shape,
            dtype,
            gather,
            timeout_s=90,
        )
    except RankError as err:
        stub = stub_error(err, fn_name, module_name)
        if stub is not None:
            raise stub from None
        raise
    for rank, (got, expected) in enumerate(results):
        if got.shape != expected.shape or got.dtype != expected.dtype:
            raise AssertionError(
                f"rank {rank}: result has shape {tuple(got.shape)} / {got.dtype}, "
                f"expected {tuple(expected.shape)} / {expected.dtype} (reduce in place)"
            )
        got_chunks = torch.tensor_split(got.reshape(-1), world_size)
        exp_chunks = torch.tensor_split(expected.reshape(-1), world_size)
        start = 0
        for c, (g, e) in enumerate(zip(got_chunks, exp_chunks, strict=True)):
            stop = start + e.numel()
            if not torch.allclose(g, e):
                raise AssertionError(
                    f"rank {rank}, chunk {c} (elements {start}:{stop}) is wrong: "
                    f"expected {e.tolist()}, got {g.tolist()}"
                )
            start = stop
    what = "an all-gather" if gather else "dist.all_reduce"
    print(f"OK: {fn_name} matches {what} on {world_size} ranks, numel={numel}")
