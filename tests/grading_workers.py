"""Workers for tests/test_grading_core.py (spawned ranks import them by name)."""

import torch
import torch.distributed as dist


def sum_of_ranks(ctx, case, group):
    """Every member all-reduces its global rank over the case's group."""
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t, group=group)
    return (dist.get_rank(group), float(t))


def first_waits_forever(ctx, case, group):
    """Group rank 0 waits for a message that no rank sends."""
    if dist.get_rank(group) == 0:
        dist.recv(torch.empty(1), group=group, group_src=1)
