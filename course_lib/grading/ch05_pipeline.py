"""Chapter 5's grader: the learner's 1F1B schedule, checked as data, then run on real ranks.

The learner writes, in a module of their own (``%%writefile my_schedule.py``),
``one_f_one_b(stages, microbatches) -> list[list[Action]]``: PipeDream-Flush, where rank
``r`` runs ``p - r - 1`` warm-up forwards, then alternates one forward and one backward,
then runs the backwards left (the cool-down). The library's own generator is
:func:`course_lib.parallel.schedules.one_f_one_b`; it is ruled out while the learner's code
runs (so are ``interleaved_1f1b`` and ``zero_bubble_h1``, which contain it), by name
(:func:`~course_lib.grading.core.forbid`) and by any alias (a profiling guard that
refuses a call to their code objects, however they were reached). ``Action`` and
``gpipe`` stay allowed.

Two stages, each in spawned ranks (so an endless loop ends at a deadline, as a hint):

1. **The schedule as data** (one rank, no model). For every ``(p, m)`` of
   :data:`SIZES`: the result must be a list of ``p`` lists of ``Action``; it must pass
   :func:`~course_lib.parallel.schedules.check_schedule` (every F and B once per
   micro-batch, B after its F, no deadlock; its message names the first wrong action and
   is passed on, prefixed with ``p=3, m=7:``); and it must *be* 1F1B, not merely valid:
   simulated with equal stages (``pipeline_sim.simulate``), rank ``r`` may hold at most
   ``p - r`` micro-batches' activations at once (GPipe holds ``m``) and the bubble must be
   GPipe's, ``(p - 1) / (m + p - 1)``. With fewer micro-batches than stages
   (:data:`TOO_FEW`) it must raise ``ValueError``, as the library's generator does.
2. **The executor** (2 and 3 ranks, :data:`RUNS`). Every rank imports the learner's module
   and hands the function itself to :class:`~course_lib.parallel.pipeline.PipelineParallel`
   as its ``schedule``; one step of a tiny GPT runs through it, and every rank's loss and
   every gradient (named) is compared with one device's (``RTOL`` / ``ATOL``). Each rank
   checks the schedule its own call returned (valid and 1F1B again: a function that
   answers differently from one call to the next is caught here) and reports it: it must
   be the same on every rank and be the order the rank really ran.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from fractions import Fraction
from typing import Any

import torch

from course_lib.grading.core import ATOL, RTOL, Case, ForbiddenCall, forbid, grade, import_learner
from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel import schedules as S
from course_lib.parallel.pipeline import PipelineParallel
from course_lib.parallel.pipeline_sim import simulate
from course_lib.topology import Topology

WHAT = "the 1F1B schedule"
# (p, m) every schedule is checked at: one stage, m = p, m > p, uneven m, the executor's.
SIZES = ((1, 1), (2, 2), (2, 5), (3, 3), (3, 7), (4, 4), (4, 9), (2, 4), (3, 6))
TOO_FEW = ((2, 1), (3, 2), (4, 3))  # m < p: refused with ValueError
RUNS = ((2, 4), (3, 6))  # (p, m) of the executor runs, a batch of BATCH sequences
BATCH = 12
CONFIG = GPTConfig(n_layer=4, n_head=2, n_embd=16, block_size=8, dropout=0.0)
# Stage costs of the simulation: equal stages, a backward twice a forward (exact fractions).
T_F, T_B = Fraction(1), Fraction(2)
# The library's generators of 1F1B-like schedules: the answer key is off limits.
FORBIDDEN = ("one_f_one_b", "interleaved_1f1b", "zero_bubble_h1")
ALLOWED = (
    "write the schedule yourself from Action (and gpipe, if you like); the library's "
    "one_f_one_b, interleaved_1f1b and zero_bubble_h1 are the answer key"
)
HANG_HINT = (
    "does every loop of your one_f_one_b end? A while loop whose condition never turns "
    "false (a counter never incremented, a list that never empties) never returns. If it "
    "returns, check that it depends only on (stages, microbatches): every rank calls it and "
    "runs its own row, so ranks given different schedules wait for each other forever"
)


# ----------------------------------------------------------------------------------------
# The answer key, ruled out


# Their code objects, taken at import (before any guard replaces the names): a call to one
# of them is refused however it was reached.
_FORBIDDEN_CODES = {
    getattr(S, name).__code__: f"course_lib.parallel.schedules.{name}" for name in FORBIDDEN
}


@contextlib.contextmanager
def _refuse_aliases() -> Iterator[None]:
    """Refuse a call to the forbidden generators' code, whatever name reached it.

    ``forbid`` replaces the names in ``schedules``; a reference taken elsewhere (a dict of
    schedules in another module, ``from ... import`` before the guard) still reaches the
    same code object, which this profile hook refuses at its first call.
    """
    codes = _FORBIDDEN_CODES

    def guard(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes:
            raise ForbiddenCall(f"{codes[frame.f_code]} is not allowed in this exercise: {ALLOWED}")

    previous = sys.getprofile()
    sys.setprofile(guard)
    try:
        yield
    finally:
        sys.setprofile(previous)


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    """The learner's code runs here: the library's 1F1B-like generators refused."""
    with forbid([(S, name) for name in FORBIDDEN], ALLOWED), _refuse_aliases():
        yield


def _learner(cwd: str, module_name: str, fn_name: str) -> Callable[..., Any]:
    with _guarded():  # a top-level `from course_lib.parallel.schedules import ...` too
        module = import_learner(cwd, module_name)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise AssertionError(
            f"{module_name}.py defines no function {fn_name}(stages, microbatches)"
        )
    return fn


def _call(fn: Callable[..., Any], p: int, m: int) -> Any:
    """``fn(p, m)`` under the guard; an error of the learner's code names (p, m)."""
    try:
        with _guarded():
            return fn(p, m)
    except (NotImplementedError, ForbiddenCall):
        raise
    except Exception as err:
        raise AssertionError(
            f"p={p}, m={m}: {fn.__name__}({p}, {m}) raised {type(err).__name__}: {err}"
        ) from err


# ----------------------------------------------------------------------------------------
# Stage 1: the schedule as data


def _row(actions: Sequence[Any]) -> str:
    return " ".join(str(a) for a in actions)


def _check_shape(result: Any, p: int, m: int) -> list[list[Any]]:
    """A list of p lists (rows), else an AssertionError saying what came back."""
    where = f"p={p}, m={m}"
    if isinstance(result, list) and result and all(isinstance(a, S.Action) for a in result):
        raise AssertionError(
            f"{where}: returned one flat list of {len(result)} actions; return one list per "
            f"rank, [[rank 0's actions], [rank 1's actions], ...] ({p} lists)"
        )
    if not isinstance(result, list):
        raise AssertionError(
            f"{where}: returned a {type(result).__name__}, not a list: return a list of {p} "
            "lists of Action, one per rank"
        )
    if len(result) != p:
        raise AssertionError(
            f"{where}: returned {len(result)} lists for p={p} ranks; return one list of "
            "actions per rank"
        )
    for rank, row in enumerate(result):
        if not isinstance(row, list | tuple):
            raise AssertionError(
                f"{where}: rank {rank}'s entry is a {type(row).__name__} ({row!r}), not a list "
                "of Action"
            )
    return [list(row) for row in result]


def _forwards_first(row: list[S.Action]) -> int:
    """How many forwards the rank runs before its first backward."""
    first_b = next((i for i, a in enumerate(row) if a.op == "B"), len(row))
    return sum(a.op == "F" for a in row[:first_b])


def _check_valid(schedule: list[list[Any]], p: int, m: int) -> None:
    where = f"p={p}, m={m}"
    if any(getattr(a, "op", None) == "W" for row in schedule for a in row):
        raise AssertionError(
            f"{where}: 1F1B has no W actions (splitting the backward is the zero bubble "
            "schedule): each B computes the whole backward of its micro-batch"
        )
    try:
        S.check_schedule(schedule, m)
    except ValueError as err:
        hint = ""
        if "never runs B" in str(err):
            hint = (
                " (the cool-down: after its last forward, rank r still owes the backwards "
                "of the micro-batches it has not finished)"
            )
        raise AssertionError(f"{where}: {err}{hint}") from None


def _check_1f1b(schedule: list[list[S.Action]], p: int, m: int) -> None:
    """Valid is not enough: the memory bound p - r and GPipe's bubble, with equal stages."""
    where = f"p={p}, m={m}"
    sim = simulate(schedule, T_F, T_B)
    for rank, peak in enumerate(sim.peak_activations):
        if peak <= p - rank:
            continue
        row, before = schedule[rank], _forwards_first(schedule[rank])
        if before == m:
            how = (
                f"it holds all m = {m} micro-batches' activations at once, like GPipe (every "
                "forward before the first backward): start the backwards as soon as the "
                f"pipeline is full, after a warm-up of p - r - 1 = {p - rank - 1} forward(s), "
                "then alternate one forward and one backward"
            )
        else:
            how = (
                f"it runs {before} forwards before its first backward; 1F1B runs p - r = "
                f"{p - rank} (a warm-up of p - r - 1 = {p - rank - 1}, then the steady state's "
                "first forward), then one backward and one forward in turn"
            )
        raise AssertionError(
            f"{where}: rank {rank} holds the activations of {peak} micro-batches at once; "
            f"1F1B holds at most p - r = {p - rank} there: {how}. Rank {rank} runs: {_row(row)}"
        )
    want = Fraction(p - 1, m + p - 1)
    if sim.bubble_fraction != want:
        rank = next(
            (r for r in range(p) if _forwards_first(schedule[r]) != p - r),
            max(range(p), key=lambda r: sim.makespan - sim.busy[r]),
        )
        raise AssertionError(
            f"{where}: with equal stages (t_B = 2 t_F) the bubble is "
            f"{float(sim.bubble_fraction):.3f}, but 1F1B's is GPipe's, (p - 1) / (m + p - 1) "
            f"= {float(want):.3f}: some rank waits when it could work. Rank {rank} runs "
            f"{_forwards_first(schedule[rank])} forwards before its first backward (1F1B: p - r "
            f"= {p - rank}: a warm-up of p - r - 1, then the steady state's first forward), "
            f"then one backward and one forward in turn: {_row(schedule[rank])}"
        )


def _check_too_few(fn: Callable[..., Any], p: int, m: int) -> None:
    """m < p: the library's generator refuses with ValueError; so must the learner's."""
    where = f"p={p}, m={m}"
    hint = (
        "with fewer micro-batches than stages 1F1B never reaches its steady state: raise "
        "ValueError naming m and p (as the library's one_f_one_b does, e.g. 'need m >= p')"
    )
    try:
        with _guarded():
            fn(p, m)
    except ValueError:
        return
    except (NotImplementedError, ForbiddenCall):
        raise
    except Exception as err:
        raise AssertionError(f"{where}: raised {type(err).__name__} ({err}): {hint}") from err
    raise AssertionError(f"{where}: returned a schedule: {hint}")


def _pure_worker(ctx, case: Case, group, cwd: str, module_name: str, fn_name: str) -> int:
    """On one rank: every (p, m) of SIZES checked as data, then TOO_FEW; the count checked."""
    fn = _learner(cwd, module_name, fn_name)
    for p, m in SIZES:
        schedule = _check_shape(_call(fn, p, m), p, m)
        _check_valid(schedule, p, m)
        _check_1f1b(schedule, p, m)
    for p, m in TOO_FEW:
        _check_too_few(fn, p, m)
    return len(SIZES)


# ----------------------------------------------------------------------------------------
# Stage 2: the executor, on real ranks


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, CONFIG.block_size + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]  # (B, T) inputs and targets


def _model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


class _Recorded:
    """The learner's function as ``PipelineParallel`` calls it: guarded, its result kept."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.schedule = fn, None

    def __call__(self, stages: int, microbatches: int) -> list[list[S.Action]]:
        schedule = _check_shape(_call(self.fn, stages, microbatches), stages, microbatches)
        _check_valid(schedule, stages, microbatches)
        _check_1f1b(schedule, stages, microbatches)  # again: this call may differ from stage 1
        self.schedule = schedule
        return schedule


def _run_worker(ctx, case: Case, group, cwd: str, module_name: str, fn_name: str, m: int):
    """On each rank: one step of the tiny GPT through the learner's schedule."""
    torch.set_num_threads(1)
    recorded = _Recorded(_learner(cwd, module_name, fn_name))
    pp = PipelineParallel(_model(), Topology(pp=ctx.world_size), recorded, m)
    loss = pp.run(*_batch())
    ran = [str(r.action) for r in pp.records]
    return {
        "loss": loss,
        "grads": {name: p.grad.clone() for name, p in pp.named_parameters()},
        "schedule": [[str(a) for a in row] for row in recorded.schedule],
        "ran": ran,
    }


def _reference() -> tuple[float, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    model = _model()
    x, y = _batch()
    loss = loss_fn(model(x), y)
    loss.backward()
    return float(loss.detach()), {n: p.grad for n, p in model.named_parameters()}


def _compare(p: int, m: int, results: list[dict], ref_loss: float, ref: dict) -> int:
    """Every rank's schedule, order, loss and gradients; returns the gradients compared."""
    where = f"on {p} ranks, m={m}"
    for rank, res in enumerate(results):
        if res["schedule"] != results[0]["schedule"]:
            raise AssertionError(
                f"{where}: rank {rank} got a different schedule from rank 0 (rank 0: "
                f"{results[0]['schedule']}, rank {rank}: {res['schedule']}): one_f_one_b must "
                "depend only on (stages, microbatches)"
            )
        if res["ran"] != res["schedule"][rank]:
            raise AssertionError(
                f"{where}: rank {rank} ran {' '.join(res['ran'])}, its row says "
                f"{' '.join(res['schedule'][rank])}"
            )
    compared = 0
    for rank, res in enumerate(results):
        if abs(res["loss"] - ref_loss) > ATOL + RTOL * abs(ref_loss):
            raise AssertionError(
                f"{where}: rank {rank}'s loss is {res['loss']:.7f}, one device's {ref_loss:.7f}"
            )
        for name, got in res["grads"].items():
            want = ref["wte.weight" if name == "lm_head.weight" else name]
            if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
                raise AssertionError(
                    f"{where}: rank {rank}: the gradient of {name!r} differs from one device's "
                    f"by up to {(got - want).abs().max():.3g}"
                )
            compared += 1
    return compared


# ----------------------------------------------------------------------------------------
# The grader


def grade_one_f_one_b(
    module_name: str = "my_schedule",
    fn_name: str = "one_f_one_b",
    *,
    runs: Sequence[tuple[int, int]] = RUNS,
    timeout_s: float = 30.0,
) -> None:
    """Chapter 5's graded exercise: ``module_name.fn_name(stages, microbatches)`` as 1F1B.

    First the schedules as data on one spawned rank (every ``(p, m)`` of :data:`SIZES`
    valid, 1F1B's memory bound and bubble, ``ValueError`` for the ``m < p`` of
    :data:`TOO_FEW`); then, for each ``(p, m)`` of ``runs``, one step of a tiny GPT on
    ``p`` ranks through ``PipelineParallel`` with the learner's function as its schedule,
    every rank's loss and gradients against one device (``runs=()`` skips it).
    ``timeout_s`` is each spawn's hard deadline. Prints OK, or raises AssertionError naming
    (p, m), the rank and the mistake (NotImplementedError for the stub).
    """
    cwd = os.getcwd()
    common = {"what": WHAT, "module_name": module_name, "hang_hint": HANG_HINT}
    try:
        grade(_pure_worker, [Case(1)], cwd, module_name, fn_name, timeout_s=timeout_s, **common)
    except AssertionError as err:  # one rank, no model: its "rank 0: on 1 ranks:" says nothing
        raise AssertionError(
            re.sub(r"^rank 0: on 1 ranks: (AssertionError: )?", "", str(err))
        ) from None
    ref_loss, ref = _reference() if runs else (0.0, {})
    compared = []
    for p, m in runs:
        ((_, results),) = grade(
            _run_worker, [Case(p)], cwd, module_name, fn_name, m, timeout_s=timeout_s, **common
        )
        compared.append(f"{p} ranks (m={m}): {_compare(p, m, results, ref_loss, ref)} gradients")
    sizes = ", ".join(f"({p}, {m})" for p, m in SIZES)
    print(
        f"OK: {fn_name} is 1F1B for (p, m) in {sizes}: valid, at most p - r micro-batches "
        f"alive on rank r, GPipe's bubble (p - 1)/(m + p - 1); ValueError for m < p."
        + (
            f" Run by PipelineParallel, loss and every gradient match one device: "
            f"{'; '.join(compared)}."
            if runs
            else ""
        )
    )
