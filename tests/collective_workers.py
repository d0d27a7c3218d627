"""Worker functions for tests/test_collectives.py (chapter 1's collectives).

Spawned ranks import their worker by name, so the workers live here, in an importable
module, not in the test file. One call of :func:`run_all_cases` runs every case of one
world size inside one spawn (spawning costs seconds; a case costs milliseconds) and
returns each case's result, the built-in's result and the byte counts to the parent,
which compares them.

Inputs are a pure function of (case, group rank) (:func:`make_input`), so the parent
recomputes every rank's input and the exact expected sum without talking to the ranks.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from course_lib import collectives as C
from course_lib.launch import DistContext

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "int64": torch.int64,
    "bfloat16": torch.bfloat16,
}
# 1 element (0-d and 1-d), 0 elements, fewer than the ranks, uneven, 2-D, 12 = divisible by 1..4
SHAPES = [(), (1,), (0,), (2,), (7,), (13,), (5, 3), (4, 3)]
FULL_DTYPES = ("float32", "int64")  # run on every shape; the other dtypes on FEW_SHAPES
FEW_SHAPES = [(), (7,), (5, 3)]
ALL_REDUCES = [
    "naive_all_reduce",
    "ring_all_reduce",
    "tree_all_reduce",
    "halving_doubling_all_reduce",
]
ALGORITHMS = ALL_REDUCES + [
    "ring_reduce_scatter",
    "ring_all_gather",
    "tree_broadcast",
    "tree_reduce",
]


@dataclass(frozen=True)
class Case:
    """One collective call: what runs, on which input, with which root."""

    algorithm: str  # a name from ALGORITHMS
    shape: tuple[int, ...]  # of every rank's tensor
    dtype: str  # a key of DTYPES
    root: int = 0  # group rank of src (broadcast) or dst (reduce); 0 for the others
    segment_bytes: int | None = None  # C.SEGMENT_BYTES for this case; None keeps the default


def make_input(case: Case, group_rank: int) -> torch.Tensor:
    """The input of ``group_rank`` in ``case``: seeded by both, so anyone can recompute it."""
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case}|{group_rank}".encode()))
    if case.dtype == "int64":
        return torch.randint(-1000, 1000, case.shape, generator=gen, dtype=torch.int64)
    return torch.randn(case.shape, generator=gen, dtype=torch.float64).to(DTYPES[case.dtype])


def make_cases(world_size: int, shapes=SHAPES, dtypes=tuple(DTYPES)) -> list[Case]:
    """The algorithms that run on ``world_size`` ranks x shapes x dtypes; trees at two roots."""
    power_of_two = world_size & (world_size - 1) == 0
    cases = []
    for algorithm in ALGORITHMS:
        if algorithm == "halving_doubling_all_reduce" and not power_of_two:
            continue
        rooted = algorithm in ("tree_broadcast", "tree_reduce")
        roots = sorted({0, world_size - 1}) if rooted else [0]
        for dtype in dtypes:
            for shape in shapes if dtype in FULL_DTYPES else FEW_SHAPES:
                cases += [Case(algorithm, shape, dtype, root) for root in roots]
        # 8-byte segments: every message of more than 8 bytes goes out in several pieces,
        # exercising the pipelined receive-and-add (its buffer rows are reused)
        for shape in [s for s in ((13,), (5, 3)) if s in shapes]:
            for dtype in [d for d in ("float32", "bfloat16") if d in dtypes]:
                cases += [Case(algorithm, shape, dtype, root, 8) for root in roots]
    return cases


def _builtin(case: Case, x: torch.Tensor, group, members: list[int], rank: int) -> torch.Tensor:
    """What torch.distributed's own collective gives for ``case`` (the yardstick)."""
    n = len(members)
    if case.algorithm in ALL_REDUCES:
        dist.all_reduce(x, group=group)
        return x
    if case.algorithm == "ring_reduce_scatter":
        dist.all_reduce(x, group=group)
        return C.ring_chunks(x.view(-1), n)[rank].clone()
    if case.algorithm == "tree_broadcast":
        dist.broadcast(x, src=members[case.root], group=group)
        return x
    if case.algorithm == "tree_reduce":
        dist.reduce(x, dst=members[case.root], group=group)
        return x
    # all-gather: gloo's all_gather wants equal sizes, so pad every chunk to the largest
    chunks = C.ring_chunks(x.view(-1), n)
    padded = [torch.zeros_like(chunks[0]) for _ in range(n)]
    mine = torch.zeros_like(chunks[0])
    mine[: chunks[rank].numel()] = chunks[rank]
    dist.all_gather(padded, mine, group=group)
    return torch.cat([p[: c.numel()] for p, c in zip(padded, chunks, strict=True)]).view(x.shape)


def _ours(case: Case, x: torch.Tensor, group, members: list[int], counter) -> torch.Tensor:
    """Run our collective for ``case`` on ``x`` in place; return what the caller keeps."""
    fn = getattr(C, case.algorithm)
    if case.algorithm in ("tree_broadcast", "tree_reduce"):
        return fn(x, members[case.root], group=group, counter=counter)
    out = fn(x, group=group, counter=counter)
    return out.clone() if case.algorithm == "ring_reduce_scatter" else x


def run_case(case: Case, group, members: list[int], rank: int) -> dict:
    """One case on this rank: our result, the built-in's, and what our counter saw."""
    counter = C.CommCounter()
    default_segment = C.SEGMENT_BYTES
    C.SEGMENT_BYTES = case.segment_bytes or default_segment
    try:
        ours = _ours(case, make_input(case, rank), group, members, counter)
    finally:
        C.SEGMENT_BYTES = default_segment
    builtin = _builtin(case, make_input(case, rank), group, members, rank)
    return {
        "case": case,
        "ours": ours,
        "builtin": builtin,
        "bytes_sent": counter.bytes_sent,
        "bytes_received": counter.bytes_received,
        "messages_sent": counter.messages_sent,
        "messages_received": counter.messages_received,
        "bytes_sent_by_op": dict(counter.bytes_sent_by_op),
    }


def _error_of(fn, *args, **kwargs) -> str | None:
    """The ValueError message ``fn`` raises, or None when it raises nothing."""
    try:
        fn(*args, **kwargs)
    except ValueError as err:
        return str(err)
    return None


def bad_input_checks(group, members: list[int], rank: int) -> dict:
    """Calls that must fail before any message, then one that must still work.

    If a failing call had sent anything, the final all-reduce would receive it instead
    of its own data (wrong sum) or hang; so a correct sum proves nothing was sent.
    """
    n = len(members)
    outside = max(members) + 1  # a global rank beyond the group
    not_member = min(set(range(outside + 1)) - set(members))  # e.g. 0 for the group {1, 2, 3}
    errors = {
        "broadcast_src_out_of_range": _error_of(C.tree_broadcast, torch.ones(3), outside, group),
        "broadcast_src_not_member": _error_of(C.tree_broadcast, torch.ones(3), not_member, group),
        "reduce_dst_negative": _error_of(C.tree_reduce, torch.ones(3), -1, group),
        "broadcast_src_not_int": _error_of(C.tree_broadcast, torch.ones(3), 0.5, group),
        "reduce_scatter_non_contiguous": _error_of(
            C.ring_reduce_scatter, torch.ones(4, 3).t(), group
        ),
        "all_gather_non_contiguous": _error_of(C.ring_all_gather, torch.ones(4, 3).t(), group),
    }
    if n & (n - 1):
        errors["halving_doubling_not_power_of_two"] = _error_of(
            C.halving_doubling_all_reduce, torch.ones(3), group
        )
    base = torch.arange(12.0).view(4, 3) * (rank + 1)  # (4, 3)
    non_contiguous = {}
    for name in ALL_REDUCES:
        if name == "halving_doubling_all_reduce" and n & (n - 1):
            continue
        x = base.clone().t()  # (3, 4), non-contiguous
        getattr(C, name)(x, group=group)
        non_contiguous[name] = x.clone()
    after = torch.full((5,), float(rank + 1))
    C.ring_all_reduce(after, group=group)
    return {"errors": errors, "non_contiguous": non_contiguous, "after": after}


def _cases_on(group, members: list[int], cases: list[Case]) -> list[dict]:
    rank = dist.get_rank(group)
    return [run_case(case, group, members, rank) for case in cases]


def run_all_cases(ctx: DistContext, subgroup: list[int] | None = None) -> dict:
    """Chapter 1 tests: every case on the world group, then (optionally) on ``subgroup``.

    Returns, per rank: ``main`` (list of run_case dicts), ``checks`` (bad_input_checks),
    and ``sub``/``sub_checks`` for the subgroup (None on ranks outside it).
    """
    world = list(range(ctx.world_size))
    out = {
        "main": _cases_on(None, world, make_cases(ctx.world_size)),
        "checks": bad_input_checks(None, world, ctx.rank),
        "sub": None,
        "sub_checks": None,
    }
    if subgroup is not None:
        group = dist.new_group(subgroup)  # every rank must call new_group
        if ctx.rank in subgroup:
            cases = make_cases(
                len(subgroup), shapes=[(1,), (2,), (7,), (5, 3)], dtypes=("float32", "int64")
            )
            out["sub"] = _cases_on(group, subgroup, cases)
            out["sub_checks"] = bad_input_checks(group, subgroup, subgroup.index(ctx.rank))
        else:
            out["non_member_error"] = _error_of(C.ring_all_reduce, torch.ones(3), group)
        dist.barrier()
    return out
