"""Chapter 3's grader: the learner's ZeRO-1 step inside ZeroRedundancyOptimizer, vs one device.

The learner writes, in a module of their own (``%%writefile my_zero.py``), the two halves
of the step that :class:`course_lib.parallel.zero.ZeroRedundancyOptimizer` runs at stage 1
(the library's are :func:`~course_lib.parallel.zero.reduce_scatter_gradients` and
:func:`~course_lib.parallel.zero.step_and_all_gather`):

- ``reduce_scatter_gradients(zero)``: after backward, each flat group's local gradient is
  reduce-scattered and divided by N, so ``fg.shard.grad`` is the mean gradient of this
  rank's piece;
- ``step_and_all_gather(zero)``: the inner optimizer steps this rank's pieces, then every
  flat buffer is all-gathered.

``zero`` is the ZeroRedundancyOptimizer itself. For every case and every optimizer (SGD
with momentum, AdamW), each member builds one over a small model with two parameter groups
(weights with weight decay, biases without; sizes that no N divides, so the flat buffers
are padded) with the learner's functions injected, and trains it as chapter 3 does
(``finish_gradient_synchronization`` then ``step``) on its slice of the global batch.
The cases (:data:`ZERO_CASES`) are 2 ranks, then one 4-rank world graded whole and on its
subgroups (1, 2, 3) and (0, 2), where ``zero.group`` is not the world: N = 2, 4, 3 and 2
in two spawns (:data:`~course_lib.grading.core.DEFAULT_CASES` less its 3-rank spawn, which
the subgroup of 3 supersedes).
Beside it the same model trains on the whole batch with the plain optimizer.

The learner's functions run wrapped, on each rank, under a guard that rules out torch's
collectives (:func:`~course_lib.grading.core.forbid_collectives`: the step must go
through chapter 1's counted ring), and each is checked as soon as it returns, against the
single-device model of the same step:

1. after ``reduce_scatter_gradients``: every ``fg.shard.grad`` against the mean gradient
   of this rank's piece (a missing 1/N, 1/N twice, 1/world instead of 1/N on a subgroup,
   another rank's piece, an unreduced local gradient, a flat group left out are named),
   then the bytes it sent (one reduce-scatter: (N-1)/N of the buffers);
2. after ``step_and_all_gather``: this rank's own pieces (the step), then the other
   ranks' pieces (the all-gather: stale pieces mean a missing or early all-gather), then
   the bytes (one all-gather).

A deadlock (ranks running different collectives, or ``group=None`` on a subgroup) becomes
the hang hint within :data:`~course_lib.grading.core.HANG_S` seconds. After the run, the
members' parameters must be bitwise equal.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib import collectives as C
from course_lib.grading.core import (
    Case,
    close,
    forbid_collectives,
    grade,
    import_learner,
    worst,
)
from course_lib.parallel.zero import ZeroRedundancyOptimizer

IN, HIDDEN, OUT = 3, 7, 4  # weights 3*7 + 7*4 = 49, biases 7 + 4 = 11: divisible by no N in 2..5
GLOBAL_BATCH = 12  # rows of the global batch: divisible by 1, 2, 3 and 4 ranks
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
}
# N = 2 on its own (quick to fail, simplest to read), then one 4-rank world: N = 4, and the
# subgroups (1, 2, 3) and (0, 2), where zero.group is not the world (N = 3 and N = 2).
ZERO_CASES = (Case(2), Case(4), Case(4, (1, 2, 3)), Case(4, (0, 2)))
WHAT = "the ZeRO-1 step"
ALLOWED = (
    "move the gradients and parameters with chapter 1's counted ring, "
    "C.ring_reduce_scatter(fg.grad_flat, zero.group, zero.counter) and "
    "C.ring_all_gather(fg.flat, zero.group, zero.counter): torch's collectives bypass "
    "zero.counter"
)
HANG_HINT = (
    "every rank of zero.group must run the same ring collectives in the same order: "
    "C.ring_reduce_scatter then C.ring_all_gather, once per flat group, each with "
    "zero.group (group=None means the whole world, and on a subgroup ranks outside it "
    "never join the ring)"
)


class GradedModel(nn.Module):
    """A two-layer MLP with odd sizes (3 -> 7 -> 4): 60 parameters in two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(IN, HIDDEN)
        self.out = nn.Linear(HIDDEN, OUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))  # (B, OUT)


def _groups(model: nn.Module) -> list[dict]:
    """Two parameter groups, as the course's AdamW has: weights decay, biases do not."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.dim() >= 2]},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: inputs (B, IN) and targets (B, OUT)."""
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(GLOBAL_BATCH, IN, generator=gen)
    return x, torch.randn(GLOBAL_BATCH, OUT, generator=gen)


def _step_hint(got: torch.Tensor, want: torch.Tensor, before: torch.Tensor, n: int) -> str:
    """What a wrong update of our own piece looks like: none, N times too large, or by how much."""
    moved, should = (got - before).flatten(), (want - before).flatten()
    if moved.abs().max() == 0:
        return (
            "it did not move: step zero.optimizer (it was built on the shards and reads "
            "fg.shard.grad)"
        )
    ratio = float(moved @ should / (should @ should).clamp_min(1e-30))
    if abs(ratio - n) < 0.1 * n:
        return f"the update is about {n}x too large: divide the reduce-scattered sum by N"
    return (
        f"the update is {ratio:.3f} times the expected one: step zero.optimizer exactly "
        "once, after reduce_scatter_gradients has set fg.shard.grad"
    )


class _Checked:
    """The learner's two functions as ZeroRedundancyOptimizer runs them, guarded and checked.

    Before each step the worker sets what one device gives for it (:meth:`expect`); each
    function then runs with torch's collectives ruled out, and its result is compared with
    that as soon as it returns (an AssertionError on this rank names the mistake).
    """

    def __init__(self, learner: Any, optim: str, names: list[list[str]]) -> None:
        self.reduce_fn = learner.reduce_scatter_gradients
        self.step_fn = learner.step_and_all_gather
        self.optim, self.names = optim, names
        self.sent: list[int] = []  # bytes this rank sent per step
        self.reduce_sent = 0

    def expect(self, step: int, grads: list[torch.Tensor], params: list[torch.Tensor]) -> None:
        """One device's mean gradient and updated parameters, per flat group, (padded,) each."""
        self.step, self.want_grads, self.want_params = step, grads, params

    def _where(self, zero: ZeroRedundancyOptimizer, i: int) -> str:
        k = len(zero.flat_groups)
        return f"{self.optim}, step {self.step}: flat group {i} of {k} ({', '.join(self.names[i])})"

    def _one_collective(self, zero: ZeroRedundancyOptimizer) -> int:
        n = zero.world_size
        return sum(
            (n - 1) * fg.layout.padded // n * fg.flat.element_size() for fg in zero.flat_groups
        )

    # -- move 1 ---------------------------------------------------------------------------

    def reduce(self, zero: ZeroRedundancyOptimizer) -> None:
        """``reduce_scatter_gradients(zero)``, then its gradients and bytes checked."""
        local = [fg.grad_flat.clone() for fg in zero.flat_groups]  # before the in-place ring
        start = zero.counter.bytes_sent
        with forbid_collectives(ALLOWED):
            self.reduce_fn(zero)
        for i, fg in enumerate(zero.flat_groups):
            self._check_grad(zero, i, fg, local[i])
        self.reduce_sent = zero.counter.bytes_sent - start
        self._check_bytes(zero, self.reduce_sent, "reduce_scatter_gradients")

    def _check_grad(self, zero: ZeroRedundancyOptimizer, i: int, fg: Any, local: torch.Tensor):
        got, where = fg.shard.grad, self._where(zero, i)
        n, world, rank = zero.world_size, dist.get_world_size(), dist.get_rank(zero.group)
        if got is None:
            raise AssertionError(
                f"{where}: after reduce_scatter_gradients fg.shard.grad is None: set it "
                "for every flat group in zero.flat_groups (the optimizer steps fg.shard "
                "with fg.shard.grad)"
            )
        size = fg.layout.shard_numel
        if got.shape != fg.shard.shape:
            raise AssertionError(
                f"{where}: fg.shard.grad has shape {tuple(got.shape)}, fg.shard has "
                f"{tuple(fg.shard.shape)}: set it to this rank's piece (the chunk "
                "C.ring_reduce_scatter returns), divided by N"
            )
        pieces = self.want_grads[i].split(size)  # every group rank's mean-gradient piece
        want = pieces[rank]
        if close(got, want):
            return
        got = got.detach()
        mine = fg.layout.shard(local)
        candidates: list[tuple[torch.Tensor, str]] = [
            (want * n, f"it is the sum over the N = {n} ranks, not the mean: divide the "
                       "reduce-scattered piece by N (zero.world_size)"),
        ]  # fmt: skip
        if world != n:
            candidates.append((want * n / world, (
                f"it is divided by {world}, the size of the whole world "
                f"(dist.get_world_size()), not by N = {n}, the size of zero.group: "
                "divide by zero.world_size"
            )))  # fmt: skip
        candidates += [
            (want / n, f"it is divided by N = {n} twice: divide the reduce-scattered sum once"),
            (mine, "it is this rank's own local gradient of its piece, not the sum over "
                   "ranks: reduce-scatter fg.grad_flat with C.ring_reduce_scatter first"),
            (mine / n, "it is this rank's own local gradient of its piece divided by N, not "
                       "the mean over ranks: reduce-scatter fg.grad_flat with "
                       "C.ring_reduce_scatter first"),
        ]  # fmt: skip
        candidates += [
            (piece, f"it is the mean gradient of group rank {j}'s piece, not this rank's "
                    f"(group rank {rank}): keep the chunk C.ring_reduce_scatter returns "
                    "(fg.layout.shard), whose index is the rank in zero.group")
            for j, piece in enumerate(pieces) if j != rank
        ]  # fmt: skip
        fallback = "set it to the reduce-scattered sum of fg.grad_flat, divided by N"
        hint = next((h for value, h in candidates if close(got, value)), fallback)
        raise AssertionError(
            f"{where}: after reduce_scatter_gradients fg.shard.grad differs from the mean "
            f"gradient of this rank's piece {worst(got, want)}: {hint}"
        )

    # -- moves 2 and 3 --------------------------------------------------------------------

    def step(self, zero: ZeroRedundancyOptimizer) -> None:
        """``step_and_all_gather(zero)``, then our pieces, the others' and the bytes checked."""
        before = [fg.flat.clone() for fg in zero.flat_groups]
        start = zero.counter.bytes_sent
        with forbid_collectives(ALLOWED):
            self.step_fn(zero)
        sent = zero.counter.bytes_sent - start
        n, rank = zero.world_size, dist.get_rank(zero.group)
        for i, fg in enumerate(zero.flat_groups):  # the step: our own pieces
            got, want = fg.layout.shard(fg.flat), fg.layout.shard(self.want_params[i])
            if not close(got, want):
                hint = _step_hint(got, want, fg.layout.shard(before[i]), n)
                raise AssertionError(
                    f"{self._where(zero, i)}: after step_and_all_gather this rank's piece "
                    f"of fg.flat differs from the single-device model {worst(got, want)}: "
                    f"{hint}"
                )
        for i, fg in enumerate(zero.flat_groups):  # the all-gather: the other ranks' pieces
            size = fg.layout.shard_numel
            got, want, old = (t.split(size) for t in (fg.flat, self.want_params[i], before[i]))
            wrong = [j for j in range(n) if j != rank and not close(got[j], want[j])]
            if not wrong:
                continue
            where = f"{self._where(zero, i)}: after step_and_all_gather"
            if all(torch.equal(got[j], old[j]) for j in wrong):
                if sent < self._one_collective(zero):
                    hint = (
                        "did every rank all-gather? Call C.ring_all_gather(fg.flat, "
                        "zero.group, zero.counter) for every flat group, after "
                        "zero.optimizer.step()"
                    )
                else:
                    hint = (
                        f"step_and_all_gather sent {sent} bytes, but not the updated pieces: "
                        "all-gather fg.flat itself (the parameters are views of it) after "
                        "zero.optimizer.step(), not before (that sends the old pieces)"
                    )
                raise AssertionError(
                    f"{where} the pieces of group ranks {wrong} still hold their values "
                    f"from before the step: {hint}"
                )
            j = wrong[0]
            raise AssertionError(
                f"{where} the piece of group rank {j} differs from the single-device model "
                f"{worst(got[j], want[j])}: all-gather fg.flat in place with "
                "C.ring_all_gather (chunk r of fg.flat is group rank r's piece)"
            )
        self._check_bytes(zero, sent, "step_and_all_gather")
        self.sent.append(self.reduce_sent + sent)

    # -- bytes ----------------------------------------------------------------------------

    def _check_bytes(self, zero: ZeroRedundancyOptimizer, got: int, fn: str) -> None:
        """One ring collective over every flat buffer: (N - 1)/N of the padded bytes."""
        one = self._one_collective(zero)
        if got == one:
            return
        padded = sum(fg.layout.padded * fg.flat.element_size() for fg in zero.flat_groups)
        ring = "C.ring_reduce_scatter" if fn == "reduce_scatter_gradients" else "C.ring_all_gather"
        if got == 0:
            hint = f"nothing was counted: pass zero.counter to {ring}"
        elif got == 2 * one and fn == "reduce_scatter_gradients":
            hint = (
                "an all-reduce in place of the reduce-scatter sends 2(N-1)/N; each rank "
                "needs only the sum of its own piece: C.ring_reduce_scatter"
            )
        elif got == 2 * one:
            hint = "an all-reduce in place of the all-gather sends twice the bytes: " + ring
        else:
            hint = f"one {ring} per flat group, each with zero.counter"
        raise AssertionError(
            f"{self.optim}, step {self.step}: {fn} sent {got} bytes on this rank, expected "
            f"(N-1)/N x {padded} = {one} (one ring over every flat buffer): {hint}"
        )


def _names(model: nn.Module, zero: ZeroRedundancyOptimizer) -> list[list[str]]:
    """The parameter names of each flat group, for the hints."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in fg.params] for fg in zero.flat_groups]


def _train(ctx, group, learner: Any, optim: str, steps: int) -> dict:
    """One optimizer on this member: the learner's ZeRO-1 steps, each checked against one device."""
    optimizer_class, kwargs = OPTIMIZERS[optim]
    n, rank = dist.get_world_size(group), dist.get_rank(group)
    torch.manual_seed(0)
    model, ref = GradedModel(), GradedModel()
    ref.load_state_dict(model.state_dict())
    checked = _Checked(learner, optim, [])
    zero = ZeroRedundancyOptimizer(
        _groups(model), optimizer_class, group=group, stage=1, counter=C.CommCounter(),
        module=model, reduce_scatter_gradients=checked.reduce,
        step_and_all_gather=checked.step, **kwargs,
    )  # fmt: skip
    checked.names = _names(model, zero)
    ref_groups = _groups(ref)
    ref_opt = optimizer_class(ref_groups, **kwargs)
    b = GLOBAL_BATCH // n
    mine = slice(rank * b, (rank + 1) * b)
    for step in range(1, steps + 1):
        x, y = _batch(step)
        ref_opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        like = zero.flat_groups[0].flat
        grads = [
            fg.layout.flatten([p.grad for p in g["params"]], like)
            for fg, g in zip(zero.flat_groups, ref_groups, strict=True)
        ]
        ref_opt.step()
        params = [
            fg.layout.flatten([p.detach() for p in g["params"]], like)
            for fg, g in zip(zero.flat_groups, ref_groups, strict=True)
        ]
        checked.expect(step, grads, params)
        zero.zero_grad()
        F.mse_loss(model(x[mine]), y[mine]).backward()
        zero.finish_gradient_synchronization()  # the learner's reduce_scatter_gradients
        zero.step()  # the learner's step_and_all_gather
    padded = sum(fg.layout.padded * fg.flat.element_size() for fg in zero.flat_groups)
    flats = [fg.flat.detach().clone() for fg in zero.flat_groups]
    return {"flats": flats, "sent": checked.sent, "padded_bytes": padded}


def _zero1_worker(ctx, case: Case, group, cwd: str, module_name: str, optims, steps: int):
    """One member of ``case``: every optimizer in turn, the learner's functions injected."""
    with forbid_collectives(ALLOWED):  # a top-level `from torch.distributed import ...` too
        learner = import_learner(cwd, module_name)
    return {optim: _train(ctx, group, learner, optim, steps) for optim in optims}


def _check_equal(case: Case, results: list[dict], optims: Sequence[str], steps: int) -> None:
    """After the run the members must hold bitwise the same parameters (one all-gather)."""
    for optim in optims:
        first = results[0][optim]["flats"]
        for j, res in enumerate(results[1:], start=1):
            for i, (a, b) in enumerate(zip(first, res[optim]["flats"], strict=True)):
                if not torch.equal(a, b):
                    raise AssertionError(
                        f"{case.describe()}: {optim}: after {steps} steps group rank {j}'s "
                        f"flat group {i} is not bitwise equal to group rank 0's: did every "
                        "rank all-gather? Every rank must leave with the very same bytes, "
                        "the all-gathered pieces"
                    )


def grade_zero1_step(
    module_name: str,
    optim: str | Iterable[str] = ("sgd", "adamw"),
    steps: int = 3,
    cases: Iterable[Case] = ZERO_CASES,
    *,
    world_size: int | None = None,
) -> None:
    """Chapter 3's graded exercise: the learner's ZeRO-1 step inside ZeroRedundancyOptimizer.

    Runs ``ZeroRedundancyOptimizer`` (stage 1) with ``module_name.reduce_scatter_gradients``
    and ``module_name.step_and_all_gather`` injected, for ``steps`` steps of each optimizer
    in ``optim`` ("sgd": momentum 0.9 and weight decay; "adamw"), on every case of
    ``cases`` (default :data:`ZERO_CASES`: 2 ranks, 4 ranks, then subgroups of 3 and 2
    of those 4);
    ``world_size=N`` is short for ``cases=[Case(N)]``. Prints OK, or raises
    AssertionError naming the case, the optimizer, the step and the mistake
    (NotImplementedError for the stub).
    """
    optims = (optim,) if isinstance(optim, str) else tuple(optim)
    unknown = [o for o in optims if o not in OPTIMIZERS]
    if unknown or not optims:
        raise ValueError(f"optim={optim!r}: choose among {sorted(OPTIMIZERS)}")
    cases = [Case(world_size)] if world_size is not None else list(cases)
    ran = grade(
        _zero1_worker, cases, os.getcwd(), module_name, optims, steps,
        what=WHAT, module_name=module_name, hang_hint=HANG_HINT,
    )  # fmt: skip
    for case, results in ran:
        _check_equal(case, results, optims, steps)
    sizes = {}
    for case, results in ran:
        n = len(case.members())
        res = results[0][optims[0]]
        sizes.setdefault(n, (res["sent"][-1], res["padded_bytes"]))
    per_n = "; ".join(
        f"N={n}: sent {s} bytes = 2({n}-1)/{n} x {p} padded bytes"
        for n, (s, p) in sorted(sizes.items())
    )
    where = "; ".join(case.describe() for case, _ in ran)
    print(
        f"OK: {module_name} inside ZeroRedundancyOptimizer matches single-device "
        f"{' and '.join(optims)} for {steps} steps, every parameter on every rank after every "
        f"step: {where}. Each rank sent 2(N-1)/N of the flat buffers per step ({per_n})."
    )
