"""Chapter 7: the one place where global ranks become coordinates on a DP x PP x TP grid.

The layout is Megatron-LM's and torchtitan's, tensor parallelism varying fastest::

    global rank = (dp_index * pp + pp_index) * tp + tp_index

which is picotron's ``torch.arange(world).view(dp, pp, tp)``: ``grid[d, p, t]`` is the
global rank at those coordinates. The ``tp`` ranks of one tensor-parallel group are
neighbours (on a GPU box: one node, the fast links), the ``dp`` ranks of one
data-parallel group are ``pp * tp`` apart.

``Topology(dp, pp, tp)`` is a collective: every rank builds it, after the process group
exists, with the same sizes. It creates *every* group of every axis with
``dist.new_group``, in the same order on every rank (``new_group`` must be called by all
ranks, even for groups they are not in), and keeps the three this rank belongs to. A
group of one rank, or one spanning the whole world, is made the same way rather than
special-cased as ``None`` or ``dist.group.WORLD``: one code path, and a size-1 group's
collectives are no-ops, so a strategy never needs an ``if group is None``. (The one
exception: a single process without ``torch.distributed``, ``Topology()``, where all
three groups are ``None`` and nothing communicates.) Each group's
ranks ascend, so ``tp_ranks()[i]`` is the rank whose group rank is ``i``. Before creating
groups the ranks compare their sizes (one ``all_gather_object``): a rank that asked for
another grid fails with a clear error instead of hanging inside ``new_group``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

AXES = ("dp", "pp", "tp")  # the grid's dimensions, slowest varying first


def factorisations(world_size: int) -> list[tuple[int, int, int]]:
    """Chapter 7: every (dp, pp, tp) with dp * pp * tp == world_size, largest dp first."""
    divisors = [d for d in range(world_size, 0, -1) if world_size % d == 0]
    return [
        (dp, pp, world_size // (dp * pp))
        for dp in divisors
        for pp in divisors
        if (world_size // dp) % pp == 0
    ]


def _check_sizes(sizes: dict[str, int]) -> int:
    """Refuse sizes that are not ints >= 1 or do not fill the world; return the world size."""
    for name, size in sizes.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be an integer >= 1 (ranks on that axis), got {size!r}")
    dp, pp, tp = sizes.values()
    if not dist.is_initialized():
        if dp * pp * tp != 1:
            raise ValueError(
                f"dp={dp} x pp={pp} x tp={tp} = {dp * pp * tp} ranks, but no process group "
                "exists (a single process); build the Topology inside a worker launched with "
                "course_lib.launch.run_distributed or torchrun, or use dp=pp=tp=1"
            )
        return 1
    world = dist.get_world_size()
    if dp * pp * tp != world:
        valid = ", ".join(f"({a},{b},{c})" for a, b, c in factorisations(world))
        raise ValueError(
            f"dp={dp} x pp={pp} x tp={tp} = {dp * pp * tp} ranks, but the world has {world}; "
            f"valid (dp, pp, tp) for {world} ranks: {valid}"
        )
    return world


def _check_same_everywhere(sizes: tuple[int, int, int]) -> None:
    """Raise ValueError on every rank unless every rank asked for the same grid."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, sizes)
    if len(set(everyone)) > 1:
        per_rank = ", ".join(f"rank {r}: {s}" for r, s in enumerate(everyone))
        raise ValueError(
            f"ranks built Topology with different (dp, pp, tp): {per_rank}; "
            "pass the same sizes on every rank"
        )


class Topology:
    """Chapter 7: this rank's place on the DP x PP x TP grid, and the groups of each axis."""

    def __init__(self, dp: int = 1, pp: int = 1, tp: int = 1) -> None:
        if dist.is_initialized():  # first: a rank that asked for other sizes must not hang
            _check_same_everywhere((dp, pp, tp))
        self.world_size = _check_sizes({"dp": dp, "pp": pp, "tp": tp})
        self.dp, self.pp, self.tp = dp, pp, tp
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.dp_rank, self.pp_rank, self.tp_rank = self.coordinates(self.rank)
        grid = torch.arange(self.world_size).view(dp, pp, tp)  # (dp, pp, tp)
        self._ranks: dict[str, list[int]] = {}  # axis -> this rank's group, global ranks
        self._groups: dict[str, dist.ProcessGroup | None] = dict.fromkeys(AXES)
        if not dist.is_initialized():  # one process: every group is just rank 0
            self._ranks = {axis: [0] for axis in AXES}
        else:
            for dim, axis in enumerate(AXES):
                lines = grid.movedim(dim, -1).reshape(-1, grid.shape[dim])  # (groups, size)
                for members in lines.tolist():  # same order on every rank
                    group = dist.new_group(members)
                    if self.rank in members:
                        self._ranks[axis], self._groups[axis] = members, group
        self.dp_group, self.pp_group, self.tp_group = self._groups.values()

    @classmethod
    def single(cls) -> Topology:
        """Chapter 0: one process on its own, even inside a launched world: no groups.

        The single-device reference's view: dp = pp = tp = 1, every rank 0, every group
        ``None``, so nothing it does communicates (no collective to wait for).
        """
        topology = cls.__new__(cls)
        topology.dp = topology.pp = topology.tp = topology.world_size = 1
        topology.rank = topology.dp_rank = topology.pp_rank = topology.tp_rank = 0
        topology._ranks = {axis: [0] for axis in AXES}
        topology._groups = dict.fromkeys(AXES)
        topology.dp_group = topology.pp_group = topology.tp_group = None
        return topology

    @property
    def is_first_stage(self) -> bool:
        """True on the first pipeline stage (pp_rank == 0): it reads the input tokens."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage (pp_rank == pp - 1): it computes the loss."""
        return self.pp_rank == self.pp - 1

    def dp_ranks(self) -> list[int]:
        """Chapter 7: global ranks of this rank's data-parallel group, in group order."""
        return list(self._ranks["dp"])

    def pp_ranks(self) -> list[int]:
        """Chapter 7: global ranks of this rank's pipeline group, first stage first."""
        return list(self._ranks["pp"])

    def tp_ranks(self) -> list[int]:
        """Chapter 7: global ranks of this rank's tensor-parallel group, in group order."""
        return list(self._ranks["tp"])

    def global_rank(self, dp_index: int, pp_index: int, tp_index: int) -> int:
        """Chapter 7: the global rank at grid coordinates (dp_index, pp_index, tp_index)."""
        indices, sizes = (dp_index, pp_index, tp_index), (self.dp, self.pp, self.tp)
        for name, index, size in zip(AXES, indices, sizes, strict=True):
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
                raise ValueError(f"{name}_index must be an integer in 0..{size - 1}, got {index!r}")
        return (dp_index * self.pp + pp_index) * self.tp + tp_index

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """Chapter 7: the (dp_index, pp_index, tp_index) of a global rank."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be an integer in 0..{self.world_size - 1}, got {rank!r}")
        return rank // (self.pp * self.tp), rank // self.tp % self.pp, rank % self.tp

    def describe(self) -> dict[str, int]:
        """Chapter 7: the grid as plain data, e.g. for a checkpoint's manifest."""
        return {"dp": self.dp, "pp": self.pp, "tp": self.tp, "world_size": self.world_size}

    def __repr__(self) -> str:
        """The grid, one line per (dp, pp) row of tp ranks, with this rank in brackets."""
        lines = [
            f"Topology(dp={self.dp}, pp={self.pp}, tp={self.tp}), rank {self.rank} = "
            f"(dp {self.dp_rank}, pp {self.pp_rank}, tp {self.tp_rank})"
        ]
        width = len(str(self.world_size - 1))
        for d in range(self.dp):
            for p in range(self.pp):
                cells = []
                for t in range(self.tp):
                    r = self.global_rank(d, p, t)
                    cells.append(f"[{r:>{width}}]" if r == self.rank else f" {r:>{width}} ")
                lines.append(f"  dp {d} pp {p} | tp: {''.join(cells)}".rstrip())
        return "\n".join(lines)


def print_rank0(topology: Topology, *args: Any, **kwargs: Any) -> None:
    """Chapter 7: ``print(*args, **kwargs)`` on global rank 0 only; the other ranks stay quiet."""
    if topology.rank == 0:
        print(*args, **kwargs)
