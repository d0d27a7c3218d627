"""Flat buffers: tensors laid end to end in one 1-D buffer, cut into N equal pieces.

The one home of the layout that chapter 2's gradient buckets, chapter 3's ZeRO and FSDP,
chapter 4's parameter server and the sharded checkpoints share: tensor ``i`` occupies
``[offsets[i], offsets[i] + numels[i])`` of the buffer, the total is padded up to a
multiple of N, and rank ``r`` owns the ``r``-th of the N equal pieces.
"""

from __future__ import annotations

import math

import torch


class FlatLayout:
    """Chapter 3: tensors of one dtype end to end in a flat (padded,) buffer, cut N ways.

    ``padded`` is the total rounded up to a multiple of N, so every shard has
    ``shard_numel`` elements; the zeros of the padding never change (their gradient is 0).
    """

    def __init__(self, shapes: list[torch.Size], rank: int, world_size: int) -> None:
        self.shapes = shapes
        self.numels = [math.prod(s) for s in shapes]
        self.offsets = [sum(self.numels[:i]) for i in range(len(shapes))]
        self.numel = sum(self.numels)
        self.padded = -(-self.numel // world_size) * world_size  # ceil to a multiple of N
        self.shard_numel = self.padded // world_size
        self.start = rank * self.shard_numel  # this rank's piece: [start, start + shard_numel)

    def flatten(self, tensors: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        """(padded,) buffer of ``tensors`` end to end; None and the padding become zeros."""
        flat = torch.zeros(self.padded, dtype=like.dtype, device=like.device)
        for t, start, n in zip(tensors, self.offsets, self.numels, strict=True):
            if t is not None:
                flat[start : start + n].copy_(t.reshape(-1))
        return flat

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's piece of ``flat``, shaped as the original (views, no copies)."""
        spans = zip(self.offsets, self.numels, self.shapes, strict=True)
        return [flat[start : start + n].view(shape) for start, n, shape in spans]

    def shard(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's (shard_numel,) piece of a (padded,) buffer, as a view."""
        return flat[self.start : self.start + self.shard_numel]
