"""What every grader shares: cases on real ranks, a guard on calls, hints instead of hangs.

Every chapter's grader (``course_lib.grading.chNN_*``) is built from the pieces here:

- :class:`Case` and :func:`run_cases`: run the learner's code at several world sizes and on
  subgroups (``dist.new_group``) whose group ranks differ from the global ranks, one spawn
  per world size. :data:`DEFAULT_CASES` is 2, 3 and 4 ranks, then two subgroups of 4.
- :func:`forbid`: inside the graded ranks, calls the exercise rules out (torch's built-in
  collectives where a ring is to be written by hand) raise a :class:`ForbiddenCall` that
  says which calls are allowed.
- :func:`learner_error`: a failed run becomes one message for the learner. A stub is
  "not implemented yet"; a check that failed on a rank is quoted with the rank and the
  case; a deadlock (gloo's "Timed out", "Connection closed by peer", the harness's
  deadline: whatever the failing rank reports) becomes the grader's hang hint, within
  :data:`HANG_S` seconds of the stuck call.
- :data:`RTOL` / :data:`ATOL`: the one pair of fp32 tolerances.

Every grader has a suite of wrong attempts that must fail with their hint and valid
variants that must pass (``tests/test_grader_chNN.py``).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from course_lib.launch import DeadlineError, RankError, run_distributed

# fp32 against the single-device reference, when the summation order may differ
# (DESIGN.md section 5): the one pair of tolerances every grader uses.
RTOL = 1.3e-6
ATOL = 1e-5

# A rank that waits this long for a message is deadlocked: the process group's timeout in
# every graded run, so a hang becomes a hint in about HANG_S plus the ranks' start-up.
HANG_S = 10.0
# The hard deadline of one graded spawn (an endless loop that sends nothing ends here).
# A 4-rank spawn running every case takes ~10 s on a quiet 2-core laptop but over 30 s on
# a loaded one, so the deadline leaves room: a real hang is caught by HANG_S long before.
DEADLINE_S = 60.0

# What a rank's error says when it waited for a peer that never came, in any of its forms.
_HANG_MARKERS = (
    "timed out",
    "connection closed by peer",
    "connection reset by peer",
    "broken pipe",
    "deadline",
)

# torch.distributed's collectives: ruled out where the learner writes one by hand.
COLLECTIVES = (
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "reduce_scatter", "reduce_scatter_tensor", "broadcast", "broadcast_object_list",
    "reduce", "all_to_all", "all_to_all_single", "gather", "gather_object", "scatter",
    "scatter_object_list",
)  # fmt: skip


# ----------------------------------------------------------------------------------------
# Comparing with the reference


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Same shape and equal to fp32 tolerance (:data:`RTOL`, :data:`ATOL`): every grader's test."""
    return got.shape == want.shape and torch.allclose(got, want, rtol=RTOL, atol=ATOL)


def worst(got: torch.Tensor, want: torch.Tensor) -> str:
    """``by up to D (element i: got g, expected e)`` for the largest difference, for a hint."""
    diff = (got - want).abs().flatten()
    i = int(diff.argmax())
    return (
        f"by up to {diff[i].item():.3g} (element {i}: got {got.flatten()[i].item():.6g}, "
        f"expected {want.flatten()[i].item():.6g})"
    )


# ----------------------------------------------------------------------------------------
# The learner's module


def import_learner(cwd: str, module_name: str) -> ModuleType:
    """On a rank: import the learner's ``%%writefile`` module from the notebook's folder, fresh."""
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    return importlib.import_module(module_name)


# ----------------------------------------------------------------------------------------
# Calls the exercise rules out


class ForbiddenCall(AssertionError):
    """The learner called something the exercise rules out; the message says what is allowed."""


def _refusal(qualified: str, allowed: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ForbiddenCall(f"{qualified} is not allowed in this exercise: {allowed}")

    refuse.__name__ = qualified.rsplit(".", 1)[-1]
    return refuse


@contextlib.contextmanager
def forbid(
    calls: Iterable[tuple[ModuleType, str]], allowed: str, prefix: str = "dist"
) -> Iterator[None]:
    """Within the block, each ``(module, name)`` raises :class:`ForbiddenCall` naming ``allowed``.

    ``torch.distributed`` names are replaced in ``torch.distributed.distributed_c10d`` too,
    so ``from torch.distributed import all_reduce`` done inside the block is caught as well.
    Everything is restored on exit.
    """
    saved: list[tuple[ModuleType, str, Any]] = []
    for module, name in calls:
        targets = [module]
        if module is dist:
            targets.append(dist.distributed_c10d)
        for target in targets:
            if hasattr(target, name):
                saved.append((target, name, getattr(target, name)))
                shown = f"{prefix}.{name}" if module is dist else f"{module.__name__}.{name}"
                setattr(target, name, _refusal(shown, allowed))
    try:
        yield
    finally:
        for target, name, original in reversed(saved):
            setattr(target, name, original)


def forbid_collectives(allowed: str) -> contextlib.AbstractContextManager[None]:
    """:func:`forbid` every collective of :data:`COLLECTIVES` (point-to-point stays allowed)."""
    return forbid([(dist, name) for name in COLLECTIVES], allowed)


# ----------------------------------------------------------------------------------------
# Cases: world sizes and subgroups


@dataclass(frozen=True)
class Case:
    """One graded configuration: ``world_size`` ranks, the learner's code on ``ranks``.

    ``ranks=None`` passes ``group=None`` (the default group, every rank); a tuple builds
    ``dist.new_group(ranks)``, where group rank i is the i-th smallest global rank.
    """

    world_size: int
    ranks: tuple[int, ...] | None = None

    def members(self) -> tuple[int, ...]:
        return tuple(range(self.world_size)) if self.ranks is None else tuple(sorted(self.ranks))

    def describe(self) -> str:
        if self.ranks is None:
            return f"on {self.world_size} ranks"
        return (
            f"on the subgroup of global ranks {self.members()} of {self.world_size} "
            "(group ranks 0.." + f"{len(self.members()) - 1})"
        )


DEFAULT_CASES = (Case(2), Case(3), Case(4), Case(4, (1, 2, 3)), Case(4, (0, 2)))


class CaseFailed(AssertionError):
    """A rank's failure inside one case, on one line: ``<case>: <Error>: <message>``."""


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _cases_worker(ctx: Any, worker: Callable[..., Any], cases: list[Case], args: tuple) -> list:
    """On each rank: ``worker(ctx, case, group, *args)`` for every case this rank is in."""
    results = []
    for case in cases:
        group = None if case.ranks is None else dist.new_group(list(case.members()))
        result = None
        try:
            if ctx.rank in case.members():
                result = worker(ctx, case, group, *args)
            dist.barrier()  # the cases never overlap (the real barrier: guards are gone by now)
        except Exception as err:
            message = f"{case.describe()}: {type(err).__name__}: {_one_line(err)}"
            raise CaseFailed(message) from err
        results.append(result)
    return results


def run_graded(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float | None = None):
    """:func:`~course_lib.launch.run_distributed` with grading's deadlines, one thread per rank.

    ``timeout_s`` defaults to :data:`DEADLINE_S`; both it and :data:`HANG_S` are read at
    call time, so a test may shorten them.
    """
    return run_distributed(
        fn, world_size, *args, timeout_s=timeout_s or DEADLINE_S, pg_timeout_s=HANG_S,
        threads_per_rank=1,
    )  # fmt: skip


def run_cases(
    worker: Callable[..., Any],
    cases: Iterable[Case],
    *args: Any,
    timeout_s: float | None = None,
) -> list[tuple[Case, list]]:
    """Run ``worker(ctx, case, group, *args)`` for each case; one spawn per world size.

    Returns ``(case, results)`` in the given order, ``results`` listing the members'
    return values in group-rank order. A failure raises the harness's error (a
    :class:`~course_lib.launch.RankError` or :class:`~course_lib.launch.DeadlineError`);
    pass it to :func:`learner_error`.
    """
    cases = list(cases)
    by_size: dict[int, list[Case]] = {}
    for case in cases:
        if case.ranks is not None and not set(case.ranks) <= set(range(case.world_size)):
            raise ValueError(f"case {case}: ranks must lie in 0..{case.world_size - 1}")
        by_size.setdefault(case.world_size, []).append(case)
    out: dict[Case, list] = {}
    for world_size, group in by_size.items():
        per_rank = run_graded(_cases_worker, world_size, worker, group, args, timeout_s=timeout_s)
        for i, case in enumerate(group):
            out[case] = [per_rank[r][i] for r in case.members()]
    return [(case, out[case]) for case in cases]


# ----------------------------------------------------------------------------------------
# A failed run, as the learner should read it


def _last_line(traceback_text: str) -> str:
    lines = [ln for ln in traceback_text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _message(traceback_text: str) -> str:
    """The failure's own words: the last line, without the exception's module path."""
    line = _last_line(traceback_text)
    line = re.sub(r"^[\w.]*CaseFailed: ", "", line)
    return re.sub(r"^(?:[\w]+\.)+(?=\w+(?:Error|Exception|Call)\b)", "", line)


def _learner_frame(traceback_text: str, module_name: str) -> str:
    """``my_ring.py, line 14, in ring_all_reduce`` for the learner's deepest frame, or ''."""
    frames = re.findall(
        rf'File "[^"]*{re.escape(module_name)}\.py", line (\d+), in (\w+)', traceback_text
    )
    if not frames:
        return ""
    line, fn = frames[-1]
    return f" ({module_name}.py, line {line}, in {fn})"


def is_hang(text: str) -> bool:
    """True when a rank's report says it waited for a peer that never came."""
    low = text.lower()
    return any(marker in low for marker in _HANG_MARKERS)


def learner_error(
    err: RankError | DeadlineError, *, what: str, module_name: str, hang_hint: str
) -> Exception:
    """The learner-facing error for a failed graded run.

    - ``NotImplementedError`` when a rank hit the exercise's stub;
    - an ``AssertionError`` quoting the first rank whose failure is not a timeout (a check
      that failed, a ``ForbiddenCall``, an exception in the learner's code, with its line);
    - an ``AssertionError`` with ``hang_hint`` when every failure is a wait that timed out.
    """
    if isinstance(err, DeadlineError):
        return AssertionError(
            f"the run hung: no rank finished within {err.timeout_s:.0f} s (an endless loop, "
            f"or a wait for a message that never came). {hang_hint}"
        )
    reports = dict(err.tracebacks)
    if any("NotImplementedError" in tb for tb in reports.values()):
        return NotImplementedError(f"{what} is not implemented yet: replace the stub in "
                                   f"{module_name}.py")  # fmt: skip
    order = [err.rank, *sorted(r for r in reports if r != err.rank)]
    for rank in order:
        text = reports.get(rank, "")
        message = _message(text)
        if text and not is_hang(message):
            return AssertionError(f"rank {rank}: {message}{_learner_frame(text, module_name)}")
    message = _message(reports.get(err.rank, "")) or str(err)
    case = message.split(": ", 1)[0] if message.startswith("on ") else "in this run"
    return AssertionError(
        f"a rank waited more than {HANG_S:.0f} s for a message that never came ({case}): "
        f"{hang_hint}"
    )


def grade(
    worker: Callable[..., Any],
    cases: Iterable[Case],
    *args: Any,
    what: str,
    module_name: str,
    hang_hint: str,
    timeout_s: float | None = None,
) -> list[tuple[Case, list]]:
    """:func:`run_cases`; a failure becomes the learner's error (:func:`learner_error`)."""
    try:
        return run_cases(worker, cases, *args, timeout_s=timeout_s)
    except (RankError, DeadlineError) as err:
        raise learner_error(err, what=what, module_name=module_name, hang_hint=hang_hint) from None


def notebook_dir() -> str:
    """Where the learner's ``%%writefile`` modules are: the kernel's working directory."""
    return os.getcwd()
