"""Chapter 1's grader: the learner's ring all-reduce / all-gather, on real ranks, by the rules.

The learner writes ``ring_all_reduce(tensor, group=None)`` and ``ring_all_gather(tensor,
group=None)`` in ``my_ring.py`` from point-to-point calls only. :func:`grade_ring` runs
one of them with :mod:`course_lib.grading.core` on 2, 3 and 4 ranks and on two subgroups
of 4 ranks (group ranks differ from global ranks there), and checks, on every rank:

- the rules: torch.distributed's collectives and the library's own collectives
  (``course_lib.collectives``, the answer key) raise inside the graded ranks, from before
  the learner's module is imported; ``dist.isend``/``dist.irecv``, ``dist.send``/
  ``dist.recv`` and ``dist.batch_isend_irecv`` with ``dist.P2POp`` stay allowed;
- the result, chunk by chunk (``torch.tensor_split(tensor.view(-1), n)``), in place. Each
  rank's input is known from its group rank, so the expected result is computed on the
  rank itself, no collective needed. The inputs are built so that a wrong chunk tells
  what went wrong: rank g's all-reduce input is ``a * 16**g`` (``a`` a fixed vector of
  small integers), so every sum of inputs, with repeats, reads back as "which ranks'
  contributions, how many times each"; the all-gather's chunks that a rank does not own
  start as the sentinel ``GARBAGE``, so a chunk that is added to instead of overwritten,
  never received, or cut at the wrong place shows;
- the bytes: every message a rank sends through ``isend`` (``send`` and
  ``batch_isend_irecv`` go through it) is counted. Where N divides the element count,
  every rank must send exactly ``comm_model.bytes_sent_per_rank`` (``2(N-1)/N * numel *
  itemsize`` for the all-reduce, ``(N-1)/N * ...`` for the all-gather): the prediction
  the chapter checks its own ring against. With uneven chunks the per-rank bytes depend
  on the chunk order, so there a ring must send ``2(N-1) * numel * itemsize`` over all
  ranks (``(N-1) * ...``) and no rank more than ``2(N-1)`` (``N-1``) of the largest chunk;
  a result that is right but sent otherwise (everything to everyone, a gather at one rank
  then a broadcast, an extra step) is no ring;
- the model against a measurement (:func:`grade_fit`, :func:`grade_deviation`): the
  learner's relative-error fit of alpha and beta, on fresh synthetic timings where an
  unweighted fit is far off, and the learner's measured / predicted ratios of the naive
  all-reduce, recomputed here from the same timings;
- hangs: a rank that waits for a message that never comes is a hint within ``HANG_S``.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

import course_lib.collectives as library
from course_lib.cost import comm_model
from course_lib.grading.core import (
    DEFAULT_CASES,
    Case,
    forbid,
    forbid_collectives,
    grade,
    import_learner,
)

BASE = 16  # rank g's all-reduce input is a * BASE**g: a sum of inputs reads back in base 16
GARBAGE = -1000.0  # what an all-gather's not-yet-received chunks hold at the start

ALLOWED = (
    "use point-to-point calls only: dist.isend/dist.irecv, dist.send/dist.recv, or "
    "dist.batch_isend_irecv with dist.P2POp"
)

HANG_HINT = (
    "every isend needs the neighbour's matching irecv. In each step, post the isend to the "
    "right neighbour AND the irecv from the left one before waiting on either (two blocking "
    "sends face to face wait forever; sending and receiving on the same side never "
    "matches), and make every rank run the same number of steps (n-1 per phase) with "
    "chunks of the same sizes."
)

GLOBAL_RANKS_HINT = (
    "dst/src are GLOBAL ranks (ranks of the whole world), but on a subgroup the ring's "
    "neighbours are GROUP ranks: pass group_dst=/group_src= (with group=group) to "
    "isend/irecv, or translate with dist.get_global_rank(group, r) when group is not None"
)

GROUPLESS_HINT = (
    "dist.get_world_size() / dist.get_rank() without group give the size of the whole world "
    "and this process's global rank; the ring runs over `group`: call "
    "dist.get_world_size(group) and dist.get_rank(group)"
)


# ----------------------------------------------------------------------------------------
# Inputs and expected results (every rank knows every rank's input)


def _digits(numel: int) -> torch.Tensor:
    """The fixed small integers ``a`` (1..9) that every rank's input is a multiple of."""
    gen = torch.Generator().manual_seed(7 + numel)
    return torch.randint(1, 10, (numel,), generator=gen).to(torch.float64)


def _contribution(g: int, numel: int) -> torch.Tensor:
    """Group rank g's values, flat, in float64: ``a * BASE**g``."""
    return _digits(numel) * float(BASE**g)


def _chunk_bounds(numel: int, n: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each of the n chunks of ``torch.tensor_split(flat, n)``."""
    sizes = [c.numel() for c in torch.tensor_split(torch.empty(numel), n)]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def rank_input(g: int, n: int, shape, dtype, gather: bool) -> torch.Tensor:
    """Group rank g's input: its contribution (all-reduce), or only its own chunk (gather)."""
    numel = math.prod(shape)
    flat = _contribution(g, numel)
    if gather:
        start, stop = _chunk_bounds(numel, n)[g]
        own = flat[start:stop].clone()
        flat = torch.full((numel,), GARBAGE, dtype=torch.float64)
        flat[start:stop] = own
    return flat.to(dtype).reshape(shape)


def expected_result(n: int, numel: int, gather: bool) -> torch.Tensor:
    """What every rank must end with, flat, in float64."""
    if not gather:
        return sum(_contribution(g, numel) for g in range(n))
    out = torch.empty(numel, dtype=torch.float64)
    for g, (start, stop) in enumerate(_chunk_bounds(numel, n)):
        out[start:stop] = _contribution(g, numel)[start:stop]
    return out


# ----------------------------------------------------------------------------------------
# What a wrong chunk says


def _multiplicities(got: torch.Tensor, digits: torch.Tensor, n: int) -> list[int] | None:
    """How many times each rank's input is in ``got``; None when no such count explains it."""
    if got.numel() == 0:
        return [1] * n
    ratio = got / digits
    if not torch.all(torch.isfinite(ratio)) or not torch.all(ratio == ratio.round()):
        return None
    values = set(ratio.round().to(torch.int64).tolist())
    if len(values) != 1:
        return None
    (value,) = values
    if value < 0 or value >= BASE**n:
        return None
    return [(value // BASE**g) % BASE for g in range(n)]


def _ranks(ranks: list[int]) -> str:
    return ("group rank " if len(ranks) == 1 else "group ranks ") + ", ".join(map(str, ranks))


def _all_reduce_hint(got: torch.Tensor, digits: torch.Tensor, n: int, me: int) -> str:
    """Why a chunk of the all-reduce is wrong, from the ranks' contributions it holds."""
    counts = _multiplicities(got, digits, n)
    if counts is None:
        return (
            "it holds values that no sum of the ranks' inputs gives: values of other elements "
            "(check the chunk index arithmetic: the chunk you receive into must be the one "
            "your left neighbour sent) or a receive buffer read before its irecv completed"
        )
    around = (
        "every chunk must go all around the ring: n-1 reduce-scatter steps (each adds the "
        "received chunk), then n-1 all-gather steps (each copies the finished chunk on)"
    )
    if counts == [1 if g == me else 0 for g in range(n)]:
        return f"it still holds only this rank's own input, nothing added or received: {around}"
    parts = []
    missing = [g for g in range(n) if counts[g] == 0]
    extra = [g for g in range(n) if counts[g] > 1]
    if missing:
        parts.append(f"it misses the input of {_ranks(missing)}: {around}")
    if extra:
        times = max(counts[g] for g in extra)
        parts.append(
            f"it counts the input of {_ranks(extra)} {times} times: in the all-gather phase "
            "overwrite the chunk with the received sum (copy_), do not add it"
        )
    return "; ".join(parts)


def _all_gather_hint(got: torch.Tensor, want: torch.Tensor, own: bool) -> str:
    """Why a chunk of the all-gather is wrong."""
    garbage = got == GARBAGE
    if torch.all(garbage):
        return (
            "it was never received: it still holds the garbage it started with (n-1 steps, "
            "each passing on the chunk received in the step before)"
        )
    diff = (got - want) / GARBAGE
    if torch.all(diff == diff.round()) and torch.all(diff >= 1) and len(set(diff.tolist())) == 1:
        return (
            "it is the right chunk plus the garbage it started with: overwrite (copy_), "
            "do not add, the received chunk"
        )
    if torch.any(garbage):
        return (
            "some of its elements still hold garbage: the chunks' boundaries are wrong. Cut "
            "the FLAT tensor, torch.tensor_split(tensor.view(-1), n): chunk r is rank r's "
            "(torch.chunk, or splitting a 2-D tensor's rows, cuts elsewhere)"
        )
    if own:
        return "it is this rank's own chunk: send it on, never write into it"
    return (
        "it holds values of another chunk: check the chunk index arithmetic (the chunk you "
        "receive into must be the one your left neighbour sent)"
    )


def _check_result(
    tensor: torch.Tensor, before: torch.Tensor, returned: Any, n: int, me: int, gather: bool
) -> None:
    """On a rank: AssertionError naming the first wrong chunk and what is wrong with it."""
    numel = tensor.numel()
    want = expected_result(n, numel, gather)
    got = tensor.detach().reshape(-1).to(torch.float64)
    if torch.equal(got, want):
        return
    if torch.equal(tensor, before) and numel > 0:
        if isinstance(returned, torch.Tensor) and returned.numel() == numel:
            if torch.equal(returned.detach().reshape(-1).to(torch.float64), want):
                raise AssertionError(
                    "the function returned the right values but `tensor` is unchanged: "
                    "write the result into `tensor` itself, in place (work on its view(-1), "
                    "not on a copy)"
                )
        raise AssertionError(
            "`tensor` is unchanged: nothing was received into it. Write into `tensor` "
            "itself, in place (tensor.view(-1) and its tensor_split chunks are views of it; a "
            "copy is not), and run n-1 steps per phase"
        )
    digits = _digits(numel)
    for c, (start, stop) in enumerate(_chunk_bounds(numel, n)):
        g, w = got[start:stop], want[start:stop]
        if torch.equal(g, w):
            continue
        if gather:
            why = _all_gather_hint(g, w, own=c == me)
        else:
            why = _all_reduce_hint(g, digits[start:stop], n, me)
        shown = ", ".join(f"{v:g}" for v in g[:6].tolist()) + (", ..." if g.numel() > 6 else "")
        raise AssertionError(f"chunk {c} (elements {start}:{stop}) is wrong: {why} (got [{shown}])")


# ----------------------------------------------------------------------------------------
# The guards around the learner's call


_sent: list[int] = []  # bytes of each message this rank sent, in the case being graded
_original_isend = c10d.isend


def _counting_isend(tensor, dst=None, group=None, tag=0, group_dst=None):
    """``dist.isend``, counting the bytes; send and batch_isend_irecv go through it."""
    _sent.append(tensor.numel() * tensor.element_size())
    return _original_isend(tensor, dst=dst, group=group, tag=tag, group_dst=group_dst)


_counting_isend.__name__ = "isend"


@contextlib.contextmanager
def _count_sends() -> Iterator[list[int]]:
    """Within the block, every isend (also inside send and batch_isend_irecv) is counted."""
    _sent.clear()
    saved = [(dist, dist.isend), (c10d, c10d.isend)]
    dist.isend = c10d.isend = _counting_isend
    try:
        yield _sent
    finally:
        for module, original in saved:
            module.isend = original


@contextlib.contextmanager
def _require_group(group) -> Iterator[None]:
    """On a subgroup, ``dist.get_world_size()`` / ``dist.get_rank()`` without group fail at once.

    They would give the world's size and the global rank, and the ring would hang or mix
    up its neighbours; failing at the call names the mistake.
    """
    if group is None:
        yield
        return
    world_size, get_rank = dist.get_world_size, dist.get_rank

    def get_world_size_of(group=None):
        if group is None:
            raise AssertionError(GROUPLESS_HINT)
        return world_size(group)

    def get_rank_in(group=None):
        if group is None:
            raise AssertionError(GROUPLESS_HINT)
        return get_rank(group)

    dist.get_world_size, dist.get_rank = get_world_size_of, get_rank_in
    try:
        yield
    finally:
        dist.get_world_size, dist.get_rank = world_size, get_rank


def _library_calls() -> list[tuple[Any, str]]:
    """Every function of ``course_lib.collectives``: the answer key is off limits."""
    return [
        (library, name)
        for name, value in vars(library).items()
        if inspect.isfunction(value) and value.__module__ == library.__name__
    ]


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


def _translated(err: Exception) -> AssertionError | None:
    """A hint for an exception of the learner's code whose cause is known, else None."""
    text = str(err)
    if "not part of group" in text or "not part of the group" in text:
        return AssertionError(f"{GLOBAL_RANKS_HINT} (torch said: {text})")
    if "Pair is not connected" in text:  # gloo: a message from a rank to itself
        return AssertionError(
            "a rank sent a message to itself (gloo has no connection from a rank to itself): "
            "the neighbours are right = (rank + 1) % n and left = (rank - 1) % n, in group "
            f"ranks. {GLOBAL_RANKS_HINT} (gloo said: {_first_line(text)})"
        )
    if isinstance(err, IndexError) and "index" in text:
        return AssertionError(
            f"a chunk index is out of range ({text}): cut the flat tensor with "
            "torch.tensor_split(tensor.view(-1), n), which always gives n chunks (torch.chunk "
            "can give fewer), and take every index % n"
        )
    return None


def _ring_worker(ctx, case: Case, group, cwd, module_name, fn_name, gather, inputs):
    """On one member rank: the learner's function on each input, under the guards.

    Returns the bytes this rank sent for each input.
    """
    members = case.members()
    n, me = len(members), members.index(ctx.rank)
    out = []
    with (
        forbid_collectives(ALLOWED),
        forbid(_library_calls(), ALLOWED),
        _count_sends() as sent,
        _require_group(group),
    ):
        fn = getattr(import_learner(cwd, module_name), fn_name)
        for shape, dtype in inputs:
            tensor = rank_input(me, n, shape, dtype, gather)
            before = tensor.clone()
            sent.clear()
            try:
                returned = fn(tensor) if group is None else fn(tensor, group=group)
            except (ValueError, RuntimeError, IndexError) as err:
                hint = _translated(err)
                if hint is None:
                    raise
                raise hint from err
            try:
                _check_result(tensor, before, returned, n, me, gather)
            except AssertionError as err:
                raise AssertionError(f"input of shape {tuple(shape)}, {dtype}: {err}") from None
            out.append(sum(sent))
    return out


# ----------------------------------------------------------------------------------------
# The grader


def _check_bytes_per_rank(case: Case, sent: list[int], shape, dtype, gather: bool) -> None:
    """In the parent, for a tensor that the group size divides: every rank's bytes sent must
    be :func:`course_lib.cost.comm_model.bytes_sent_per_rank` exactly; AssertionError if not."""
    n, numel = len(case.members()), math.prod(shape)
    itemsize = torch.empty((), dtype=dtype).element_size()
    algorithm = "ring_all_gather" if gather else "ring_all_reduce"
    want = [
        comm_model.bytes_sent_per_rank(algorithm, numel * itemsize, n, g, element_size=itemsize)
        for g in range(n)
    ]
    wrong = [g for g in range(n) if sent[g] != want[g]]
    if not wrong:
        return
    g = wrong[0]
    formula = "(N-1)/N" if gather else "2(N-1)/N"
    raise AssertionError(
        f"{case.describe()}, input of shape {tuple(shape)}, {dtype}: the result is right but "
        f"group rank {g} sent {sent[g]} bytes where comm_model.bytes_sent_per_rank"
        f"({algorithm!r}, ...) = {formula} x numel x itemsize = {want[g]} bytes "
        f"(all ranks sent: {sent}). A ring sends ONE chunk of "
        "torch.tensor_split(tensor.view(-1), n) per step to its right neighbour, "
        f"{n - 1 if gather else 2 * (n - 1)} steps in all: never the whole tensor, no "
        "extra step, no extra message"
    )


def _check_bytes(case: Case, sent: list[int], shape, dtype, gather: bool) -> None:
    """In the parent: a ring's bytes, per rank and over all ranks; AssertionError if not.

    Where N divides the element count every rank must send exactly what
    :mod:`course_lib.cost.comm_model` counts; with uneven chunks the per-rank bytes depend
    on the chunk order the learner chose, so only the total and a per-rank bound are fixed.
    """
    n, numel = len(case.members()), math.prod(shape)
    if numel % n == 0:
        _check_bytes_per_rank(case, sent, shape, dtype, gather)
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    steps = (n - 1) if gather else 2 * (n - 1)
    total = steps * numel * itemsize
    largest = max(stop - start for start, stop in _chunk_bounds(numel, n)) * itemsize
    if sum(sent) == total and max(sent) <= steps * largest:
        return
    what = "all-gather" if gather else "all-reduce"
    formula = "(N-1)" if gather else "2(N-1)"
    per_rank = ", ".join(f"group rank {g}: {b}" for g, b in enumerate(sent))
    raise AssertionError(
        f"{case.describe()}, input of shape {tuple(shape)}, {dtype}: the result is right but "
        f"this is no ring: the ranks sent {sum(sent)} bytes in all ({per_rank}). A ring "
        f"{what} sends exactly {formula} x numel x itemsize = {total} bytes over all ranks: "
        f"in each of its {formula} steps every rank sends ONE chunk "
        "(torch.tensor_split(tensor.view(-1), n)) to its right neighbour, never the whole "
        f"tensor, so no rank sends more than {steps} chunks ({steps * largest} bytes here)"
    )


# The inputs every case runs: (shape, dtype). An uneven split, fewer elements than ranks
# (empty chunks), and a 2-D float64 tensor whose rows are not its flat chunks.
INPUTS = (((10,), torch.float32), ((2,), torch.float32), ((4, 3), torch.float64))


def grade_ring(
    module_name: str,
    fn_name: str,
    *,
    gather: bool = False,
    inputs=INPUTS,
    cases=DEFAULT_CASES,
) -> None:
    """Chapter 1's graded exercise: ``module_name.fn_name`` as a ring all-reduce (sum).

    ``gather=True`` grades a ring all-gather instead: rank r starts with only chunk r of
    ``torch.tensor_split(tensor.view(-1), n)`` filled (the rest is garbage) and must end
    with every chunk, in place. Every case runs every input of ``inputs``, ``(shape,
    dtype)`` pairs (default :data:`INPUTS`); ``cases`` are
    :class:`~course_lib.grading.core.Case` s (default: 2, 3 and 4 ranks, then two
    subgroups of 4). Prints one OK line, or raises AssertionError with a hint
    (NotImplementedError while the stub is in place).
    """
    inputs = tuple((tuple(shape), dtype) for shape, dtype in inputs)
    cases = tuple(cases)
    results = grade(
        _ring_worker,
        cases,
        os.getcwd(),
        module_name,
        fn_name,
        gather,
        inputs,
        what=fn_name,
        module_name=module_name,
        hang_hint=HANG_HINT,
    )
    for case, per_rank in results:
        # inputs that N divides first: their hint names comm_model's exact bytes per rank
        order = sorted(range(len(inputs)), key=lambda i: math.prod(inputs[i][0]) % len(per_rank))
        for i in order:
            shape, dtype = inputs[i]
            _check_bytes(case, [sent[i] for sent in per_rank], shape, dtype, gather)
    what = "all-gather" if gather else "all-reduce (sum)"
    sizes = sorted({c.world_size for c in cases if c.ranks is None})
    subgroups = [c.members() for c in cases if c.ranks is not None]
    where = f"{', '.join(map(str, sizes))} ranks" if sizes else ""
    if subgroups:
        where += (" and " if where else "") + "subgroups " + ", ".join(map(str, subgroups))
    shown = "; ".join(f"{shape} {str(dtype).removeprefix('torch.')}" for shape, dtype in inputs)
    print(f"OK: {fn_name} is a ring {what} (inputs {shown}) on {where}")


# ----------------------------------------------------------------------------------------
# The model against a measurement: the learner's fit, and the deviation it explains

# All-reduce medians (seconds, slowest rank) at world size 2, from one full-size run of
# chapter 1 on a 2-core machine (loopback TCP, gloo): the data the exercise explains.
GIVEN_WORLD_SIZE = 2
GIVEN_SIZES = [1024 * 4**k for k in range(1, 9)]  # bytes: 4 KiB .. 64 MiB
GIVEN_TIMES = {
    "ring_all_reduce": [8.066e-3, 7.180e-3, 4.017e-3, 4.910e-3, 8.198e-3, 10.775e-3,
                        40.377e-3, 111.212e-3],
    "naive_all_reduce": [6.673e-3, 5.868e-3, 5.315e-3, 2.595e-3, 4.562e-3, 14.257e-3,
                         45.261e-3, 160.682e-3],
}  # fmt: skip

FIT_RTOL = 0.05  # a relative-error fit is within 1 % on the noisy check; an unweighted one >= 19 %
DEVIATION_RTOL = 0.05  # the learner's ratios against the grader's, per size

FIT_ALLOWED = "write the weighted least squares yourself with numpy (np.linalg.lstsq)"


def _fit_case(rng) -> tuple[float, float, int, list[float], list[float]]:
    """A fresh ``(alpha, beta, world_size, sizes, exact times)`` of a ring all-reduce."""
    alpha, beta = float(rng.uniform(50e-6, 500e-6)), float(rng.uniform(0.5e-9, 2e-9))
    world_size = int(rng.choice([2, 3, 4]))
    sizes = [4096 * 4.0**k for k in range(9)]  # 4 KiB .. 256 MiB
    times = [comm_model.predict("ring_all_reduce", s, world_size, alpha, beta) for s in sizes]
    return alpha, beta, world_size, sizes, times


def _call_fit(fit, sizes, times, world_size) -> tuple[float, float]:
    """The learner's ``fit(sizes, times, messages, bytes_factor)``, comm_model's fit off."""
    messages, factor = comm_model.alpha_beta_terms("ring_all_reduce", world_size)
    with forbid([(comm_model, "fit_alpha_beta")], FIT_ALLOWED):
        result = fit(list(sizes), list(times), messages, factor)
    try:
        alpha, beta = (float(v) for v in result)
    except (TypeError, ValueError):
        raise AssertionError(
            f"the fit must return (alpha, beta), two numbers; got {result!r}"
        ) from None
    return alpha, beta


def _unweighted(sizes, times, world_size) -> tuple[float, float]:
    """What a plain least squares (every absolute error alike) gives: the usual mistake."""
    messages, factor = comm_model.alpha_beta_terms("ring_all_reduce", world_size)
    x = np.asarray(sizes) * factor
    design = np.stack([np.full_like(x, messages), x], axis=1)  # (points, 2)
    (alpha, beta), *_ = np.linalg.lstsq(design, np.asarray(times), rcond=None)
    return float(alpha), float(beta)


def grade_fit(fit) -> None:
    """Chapter 1's exercise, part 2: ``fit(sizes, times, messages, bytes_factor) -> (alpha,
    beta)`` must fit ``t = alpha * messages + beta * bytes_factor * size`` by relative error.

    Checked on fresh random parameters each call (so no number can be copied): exact
    timings must give back alpha and beta (rtol 1e-6); timings with +-5 % noise, where an
    unweighted least squares is off by 19 % or more, within :data:`FIT_RTOL`; timings
    that fall with size must not give a negative parameter. ``comm_model.fit_alpha_beta``
    is switched off during the calls. Prints one OK line, or raises AssertionError.
    """
    rng = np.random.default_rng()
    alpha, beta, world, sizes, exact = _fit_case(rng)
    truth = f"(true alpha {alpha * 1e6:.1f} us, beta {beta * 1e9:.3f} ns/B, N = {world})"
    got = _call_fit(fit, sizes, exact, world)
    if not np.allclose(got, (alpha, beta), rtol=1e-6, atol=0):
        raise AssertionError(
            f"on exact timings {truth} your fit gave alpha {got[0] * 1e6:.1f} us, beta "
            f"{got[1] * 1e9:.3f} ns/B: the model is t = alpha * messages + beta * bytes_factor"
            " * size, so the design matrix has the columns [messages, bytes_factor * size]"
        )
    noisy = [t * (1 + 0.05 * (-1) ** i) for i, t in enumerate(exact)]
    got = _call_fit(fit, sizes, noisy, world)
    if not np.allclose(got, (alpha, beta), rtol=FIT_RTOL, atol=0):
        plain = _unweighted(sizes, noisy, world)
        same = np.allclose(got, plain, rtol=0.01) or (got[0] == 0 and plain[0] < 0)
        why = (
            "that is what an unweighted least squares gives: the largest sizes' absolute "
            "errors swamp alpha. Divide each row of the design matrix, and its target, by "
            "its own measured time t_i, so every point's RELATIVE error counts alike"
            if same
            else "weigh every point's relative error alike: divide each row of the design "
            "matrix, and its target, by its own measured time t_i"
        )
        raise AssertionError(
            f"on timings with +-5 % noise {truth} your fit gave alpha {got[0] * 1e6:.1f} us,"
            f" beta {got[1] * 1e9:.3f} ns/B, more than {FIT_RTOL:.0%} off: {why}"
        )
    got = _call_fit(fit, [1e3, 1e6], [2e-3, 1e-3], 2)
    if min(got) < 0:
        raise AssertionError(
            f"timings that fall with size gave alpha {got[0]:.3g}, beta {got[1]:.3g}: a "
            "latency or a time per byte is never negative. When the free fit gives a "
            "negative one, set it to 0 and refit the other alone"
        )
    print(
        f"OK: your fit recovers alpha and beta from exact timings and, within {FIT_RTOL:.0%},"
        " from timings with +-5 % noise (where an unweighted fit is off by 19 % or more)"
    )


def _deviation(sizes, ring_times, other_times, world_size, other) -> list[float]:
    """The grader's measured / predicted of ``other``, the model fitted to the ring."""
    messages, factor = comm_model.alpha_beta_terms("ring_all_reduce", world_size)
    alpha, beta = comm_model.fit_alpha_beta(sizes, ring_times, messages, factor)
    return [
        t / comm_model.predict(other, s, world_size, alpha, beta)
        for s, t in zip(sizes, other_times, strict=True)
    ]


def _deviation_hint(got, sizes, ring, naive, world) -> str:
    """Why the learner's ratios differ from the grader's, when a usual mistake explains it."""
    messages, factor = comm_model.alpha_beta_terms("ring_all_reduce", world)
    a, b = _unweighted(sizes, ring, world)
    a, b = max(a, 0.0), max(b, 0.0)
    candidates = {
        "you fitted alpha and beta without weights: fit relative errors, as in part 2": [
            t / comm_model.predict("naive_all_reduce", s, world, a, b)
            for s, t in zip(sizes, naive, strict=True)
        ],
        "you predicted with the ring's terms: the naive all-reduce has its own, "
        "alpha_beta_terms('naive_all_reduce', N)": _deviation(
            sizes, ring, naive, world, "ring_all_reduce"
        ),
        "the ratios are upside down: measured / predicted, not predicted / measured": [
            1 / r for r in _deviation(sizes, ring, naive, world, "naive_all_reduce")
        ],
    }
    for hint, ratios in candidates.items():
        if np.allclose(got, ratios, rtol=DEVIATION_RTOL):
            return hint
    return (
        "fit (alpha, beta) to the RING's times with a relative-error fit (messages and "
        "bytes_factor of 'ring_all_reduce'), then divide each measured naive time by "
        "comm_model.predict('naive_all_reduce', size, N, alpha, beta)"
    )


def grade_deviation(naive_deviation) -> None:
    """Chapter 1's exercise, part 3: ``naive_deviation(sizes, ring_times, naive_times,
    world_size)`` returns, per size, the naive all-reduce's measured / predicted time, the
    model fitted (relative errors) to the ring's times.

    Run on :data:`GIVEN_TIMES` and on a copy whose times are scaled by fresh random
    factors (a copied list of numbers fails there); each ratio must be within
    :data:`DEVIATION_RTOL` of the grader's. Prints the ratios on the given timings.
    """
    rng = np.random.default_rng()
    ring, naive = GIVEN_TIMES["ring_all_reduce"], GIVEN_TIMES["naive_all_reduce"]
    scaled_ring = [t * float(rng.uniform(0.7, 1.4)) for t in ring]
    scaled_naive = [t * float(rng.uniform(0.7, 1.4)) for t in naive]
    for label, r, n in (("the given", ring, naive), ("randomly rescaled", scaled_ring,
                                                     scaled_naive)):  # fmt: skip
        got = naive_deviation(list(GIVEN_SIZES), list(r), list(n), GIVEN_WORLD_SIZE)
        try:
            got = [float(v) for v in got]
        except TypeError:
            raise AssertionError(f"return one ratio per size (a list), got {got!r}") from None
        want = _deviation(GIVEN_SIZES, r, n, GIVEN_WORLD_SIZE, "naive_all_reduce")
        if len(got) != len(want) or not np.allclose(got, want, rtol=DEVIATION_RTOL):
            hint = _deviation_hint(got, GIVEN_SIZES, r, n, GIVEN_WORLD_SIZE)
            shown = ", ".join(f"{v:.2f}" for v in got)
            raise AssertionError(
                f"on {label} timings your ratios are [{shown}], expected "
                f"[{', '.join(f'{v:.2f}' for v in want)}]: {hint}"
            )
    ratios = _deviation(GIVEN_SIZES, ring, naive, GIVEN_WORLD_SIZE, "naive_all_reduce")
    print("OK: naive_all_reduce at N = 2, measured / predicted (model fitted to the ring):")
    for size, ratio in zip(GIVEN_SIZES, ratios, strict=True):
        print(f"  {size:>9} B  {ratio:5.2f}")
