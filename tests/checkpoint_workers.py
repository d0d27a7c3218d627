"""Worker functions for the sharded checkpoint tests; spawned ranks import them by name."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from course_lib.checkpoint import Piece, flat_pieces, flat_shard_from_full, load_full, save_sharded
from course_lib.flat import FlatLayout
from course_lib.launch import DistContext

STEP = "optimizer/step"  # a replicated (3,) int64 tensor that rank 0 alone saves


def _save(ctx: DistContext, directory: Path, pieces: dict, shapes: dict) -> None:
    meta = {"world_size": ctx.world_size, "step": 7}
    group = dist.group.WORLD
    save_sharded(
        directory, pieces, shapes, rank=ctx.rank, world_size=ctx.world_size, group=group, meta=meta
    )


def _error(ctx: DistContext, directory: Path, pieces: dict, shapes: dict) -> str:
    """The message of the ValueError that saving ``pieces`` raises on this rank."""
    try:
        _save(ctx, directory, pieces, shapes)
    except ValueError as e:
        return str(e)
    raise AssertionError("the save should have failed")


def save_flat(
    ctx: DistContext, directory: Path, names: list[str], tensors: list[torch.Tensor]
) -> dict[str, object]:
    """Save each rank's piece of the flat buffer of ``tensors``, and the replicated STEP.

    Then try two bad saves (a gap, an overlap) and return their messages.
    """
    shapes = {n: tuple(t.shape) for n, t in zip(names, tensors, strict=True)}
    shapes[STEP] = (3,)
    layout = FlatLayout([t.shape for t in tensors], ctx.rank, ctx.world_size)
    piece = layout.shard(layout.flatten(tensors, like=tensors[0]))  # (shard_numel,)
    pieces = flat_pieces(layout, names, piece)
    step = [Piece(0, 3, torch.tensor([7, 8, 9]))]
    _save(ctx, directory / "good", {**pieces, STEP: step if ctx.rank == 0 else []}, shapes)
    last = names[-1]  # rank 1 holds the last tensor's end; dropping it leaves a gap
    gap = {**pieces, STEP: step if ctx.rank == 0 else []}
    if ctx.rank == 1:
        gap[last] = []
    gap_msg = _error(ctx, directory / "gap", gap, shapes)
    overlap_msg = _error(ctx, directory / "overlap", {**pieces, STEP: step}, shapes)
    partial = [p.name for p in directory.iterdir() if p.name != "good"]
    return {"gap": gap_msg, "overlap": overlap_msg, "left": partial}


def reshard(ctx: DistContext, src: Path, dst: Path, names: list[str]) -> torch.Tensor:
    """Load ``src`` whole, rebuild this rank's flat piece, save it to ``dst``; return the piece."""
    full = load_full(src)
    tensors = [full[n] for n in names]
    layout = FlatLayout([t.shape for t in tensors], ctx.rank, ctx.world_size)
    piece = flat_shard_from_full(layout, tensors)  # (shard_numel,)
    shapes = {n: tuple(full[n].shape) for n in full}
    step = [Piece(0, 3, full[STEP])] if ctx.rank == 2 else []  # not always rank 0
    _save(ctx, dst, {**flat_pieces(layout, names, piece), STEP: step}, shapes)
    return piece
