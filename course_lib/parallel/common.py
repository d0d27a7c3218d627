"""What the data-parallel strategies share: same model everywhere, mean loss, sharded norms.

Chapters 2-3. Every function takes the process group it talks over, explicitly (from a
:class:`course_lib.topology.Topology`): inside a DP x TP grid, "every rank" means every
rank of this data-parallel group, never the whole world.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class SyncSwitch:
    """Chapters 2-3: the ``no_sync()`` switch every gradient sync has.

    Inside ``no_sync()`` backward passes only accumulate gradients locally; the next
    backward outside it (then ``finish_gradient_synchronization``) combines them all.
    """

    require_sync = True  # False inside no_sync()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        previous, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = previous


def require_member(group: dist.ProcessGroup, what: str) -> None:
    """Chapters 2-3: raise ValueError, before any communication, if this rank is not in ``group``.

    A collective over a group the caller does not belong to would wait forever or fail
    deep inside gloo; the usual cause is passing another rank's group.
    """
    if dist.get_rank(group) < 0:
        members = dist.get_process_group_ranks(group)
        raise ValueError(
            f"{what}: this rank is not a member of the group it was given (global ranks "
            f"{members}); pass this rank's own group, e.g. Topology.dp_group"
        )


def gather_object(obj: Any, group: dist.ProcessGroup) -> list[Any]:
    """Chapter 3: every group member's ``obj``, in group-rank order, on every member."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def check_same_model(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Chapter 2: raise ValueError on every rank unless every rank wraps the same model.

    Compares the parameter count, then each parameter's name and shape, and names the
    first mismatch. Every rank sees every rank's description, so all raise together.
    """
    mine = [(name, tuple(p.shape)) for name, p in module.named_parameters()]
    everyone = gather_object(mine, group)
    counts = [len(d) for d in everyone]
    if len(set(counts)) > 1:
        raise ValueError(
            f"ranks wrap different models: parameter tensors per rank {counts}; "
            "build the same model (same config) on every rank before wrapping"
        )
    for i, entries in enumerate(zip(*everyone, strict=True)):
        if len(set(entries)) > 1:
            per_rank = ", ".join(f"rank {r}: {n} {list(s)}" for r, (n, s) in enumerate(entries))
            raise ValueError(
                f"ranks wrap different models: parameter {i} differs ({per_rank}); "
                "build the same model (same config) on every rank before wrapping"
            )


@torch.no_grad()
def broadcast_module(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Chapter 2: copy the group's first rank's parameters and buffers to every member."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, group=group, group_src=0)


def global_mean(value: torch.Tensor, group: dist.ProcessGroup) -> float:
    """Chapter 2: the mean over the group of a per-rank scalar (each rank's slice is equal)."""
    total = value.detach().reshape(1).to(torch.float64)
    dist.all_reduce(total, group=group)
    return total.item() / dist.get_world_size(group)


def clip_grad_norm_(
    shards: Iterable[torch.Tensor], max_norm: float, group: dist.ProcessGroup
) -> float:
    """Chapter 3: clip gradients held as shards by their GLOBAL norm; return the norm.

    Each rank passes the pieces it owns: the squared norm is the sum of every rank's
    squared piece norms (one all-reduce over ``group``); then each piece is scaled as
    ``torch.nn.utils.clip_grad_norm_`` would scale the whole gradient.
    """
    shards = list(shards)
    grads = [p.grad for p in shards if p.grad is not None]
    device = shards[0].device if shards else torch.device("cpu")  # NCCL needs CUDA tensors
    squares = torch.zeros(1, dtype=torch.float64, device=device)
    for g in grads:
        squares += g.detach().double().pow(2).sum()
    dist.all_reduce(squares, group=group)
    total = squares.sqrt().item()
    scale = min(1.0, max_norm / (total + 1e-6))
    for g in grads:
        g.mul_(scale)
    return total


def check_optimizer_class(optimizer_class: Any) -> None:
    """Chapter 3: refuse anything that is not a ``torch.optim.Optimizer`` subclass."""
    if not (
        isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)
    ):
        raise ValueError(
            f"optimizer_class must be a torch.optim.Optimizer subclass such as torch.optim.AdamW, "
            f"got {optimizer_class!r}; pass the class itself, not an instance"
        )
