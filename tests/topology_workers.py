"""Worker functions for the topology tests; spawned ranks import them by name from here."""

from __future__ import annotations

import contextlib
import io
from typing import Any

import torch
import torch.distributed as dist

from course_lib.launch import DistContext
from course_lib.topology import AXES, Topology, print_rank0


def _probe_group(group: dist.ProcessGroup, rank: int) -> dict[str, Any]:
    """What the group really connects: its members, a sum and a gather of global ranks."""
    total = torch.tensor([float(rank)])
    dist.all_reduce(total, group=group)
    gathered = [torch.zeros(1) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, torch.tensor([float(rank)]), group=group)
    return {
        "members": dist.get_process_group_ranks(group),
        "sum": int(total.item()),
        "gathered": [int(g.item()) for g in gathered],
    }


def _report(topo: Topology) -> dict[str, Any]:
    """Everything a test checks about one rank's Topology, as plain data."""
    groups = {"dp": topo.dp_group, "pp": topo.pp_group, "tp": topo.tp_group}
    coords = [topo.coordinates(r) for r in range(topo.world_size)]
    return {
        "sizes": (topo.dp, topo.pp, topo.tp),
        "world_size": topo.world_size,
        "rank": topo.rank,
        "coords": (topo.dp_rank, topo.pp_rank, topo.tp_rank),
        "ranks": {"dp": topo.dp_ranks(), "pp": topo.pp_ranks(), "tp": topo.tp_ranks()},
        "probes": {axis: _probe_group(groups[axis], topo.rank) for axis in AXES},
        "first_last": (topo.is_first_stage, topo.is_last_stage),
        "all_coords": coords,
        "round_trip": [topo.global_rank(*c) for c in coords],
        "describe": topo.describe(),
        "repr": repr(topo),
    }


def _error(fn: Any, *args: Any, **kwargs: Any) -> str | None:
    """The ValueError message ``fn(*args, **kwargs)`` raises, or None when it succeeds."""
    try:
        fn(*args, **kwargs)
    except ValueError as err:
        return str(err)
    return None


def check_grids(ctx: DistContext, grids: list[tuple[int, int, int]]) -> dict[str, Any]:
    """Build each (dp, pp, tp) grid in turn on this rank; report each, then the refusals."""
    reports = [_report(Topology(dp, pp, tp)) for dp, pp, tp in grids]
    n = ctx.world_size
    too_many = _error(Topology, dp=n, pp=1, tp=2)  # twice the world, refused locally
    # Every rank's product is right, but rank 0 asks for a different grid: all must refuse.
    disagree = _error(Topology, dp=n, pp=1, tp=1) if ctx.rank == 0 else _error(Topology, tp=n)
    still_works = _report(Topology(dp=n))  # the refusals left every rank in step
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        print_rank0(Topology(dp=n), "hello from", "rank", ctx.rank)
    return {
        "reports": reports,
        "too_many": too_many,
        "disagree": disagree,
        "still_works": still_works,
        "printed": out.getvalue(),
    }
