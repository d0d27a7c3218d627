"""Chapter 2's grader: the learner's bucketed gradient hook inside DataParallel, vs one device.

The learner writes, in a module of their own (``%%writefile my_buckets.py``), the two
functions that :class:`course_lib.parallel.data_parallel.DataParallel` runs in overlapped
mode (the library's are :func:`~course_lib.parallel.data_parallel.grad_ready` and
:func:`~course_lib.parallel.data_parallel.launch_ready_buckets`):

- ``grad_ready(state, p)``: runs inside backward once ``p.grad`` is complete; copies it
  into its slot of its bucket, marks it ready, then calls ``launch_ready_buckets``;
- ``launch_ready_buckets(state)``: starts, in index order, the asynchronous all-reduce of
  every bucket whose gradients are all in, stores the ``Work`` in ``bucket.work`` and
  advances ``state.next_bucket``.

``state`` is the DataParallel itself. How the grader grades, on every case of
:data:`CASES` (three ranks, and a subgroup of two of them whose group ranks differ from
the global ranks, both in one spawn by :func:`course_lib.grading.core.run_cases`; or
``world_size=n`` alone) and every bucket cap:

- it wraps :class:`ToyNet` (tied weights, a frozen layer, an unused layer whose bucket
  never fills in backward while the bucket after it does) in
  ``DataParallel(model, "overlapped", cap, group=..., grad_ready=...,
  launch_ready_buckets=...)`` with the learner's functions injected;
- it watches every ``dist.all_reduce`` the learner starts (directly or through
  ``state.all_reduce``), its arguments bound by torch's own signature (positional or
  keyword): a bucket's buffer, on ``state.group``, in index order, once, full, holding
  each gradient unscaled at its offset, asynchronous, the ``SUM`` op;
- the ``Work`` it returns is a proxy whose ``wait()`` inside backward fails: waiting
  there is no overlap;
- after each call of the learner's functions it checks ``state.next_bucket`` and
  ``bucket.work``; after backward, that every gradient is marked ready and every full
  bucket started during backward;
- it compares every gradient and parameter with the single-device reference, naming the
  one that differs, and checks the ranks end bitwise equal.

A deadlock (a loop that waits for a bucket to fill) becomes :data:`HANG_HINT` at core's
deadline (25 s); a stub, ``NotImplementedError``.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib.grading.core import ATOL, RTOL, Case, grade, import_learner
from course_lib.launch import run_distributed
from course_lib.parallel.data_parallel import DataParallel

VOCAB, WIDTH, HIDDEN = 11, 6, 13  # odd sizes on purpose
GLOBAL_BATCH, SEQ = 12, 5  # 12 sequences: divisible by 1, 2, 3 and 4 ranks

# Three ranks (their fp32 sums are no longer bitwise those of one device), then the
# subgroup of global ranks 1 and 2 (group rank 0 is global rank 1, global rank 0 stays
# out): one spawn for both, as graded runs cost mostly their start-up.
CASES = (Case(3), Case(3, (1, 2)))
DEFAULT_CAPS_MB = (100 / 2**20, 25.0)  # smaller than the largest parameter; one bucket

HANG_HINT = (
    "launch_ready_buckets must return at the first bucket that is not full yet (backward "
    "fills it later: do not loop or wait for it), and every rank must start the same "
    "buckets, in index order, on state.group"
)


class ToyNet(nn.Module):
    """Chapter 2's grading model: tied weights, a frozen layer, an unused layer, odd sizes.

    ``head_bias``, the model's own parameter, comes first in ``parameters()``, so its
    bucket is the last one although its gradient is the first in: with small buckets
    that last bucket is full while the unused layer's bucket before it never fills in
    backward (a launch out of index order shows).
    """

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(5, 3)  # never called: no gradient; its bucket starts last
        self.embed = nn.Embedding(VOCAB, WIDTH)  # also the output head (tied)
        self.hidden = nn.Linear(WIDTH, HIDDEN)
        self.out = nn.Linear(HIDDEN, WIDTH)
        self.frozen = nn.Linear(WIDTH, WIDTH).requires_grad_(False)
        self.head_bias = nn.Parameter(torch.zeros(VOCAB))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (B, T, W)
        h = h + self.out(torch.tanh(self.hidden(h)))  # (B, T, W)
        h = self.frozen(h)
        logits = h @ self.embed.weight.T + self.head_bias  # (B, T, V), tied head
        return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def _describe_worker(ctx, bucket_cap_mb: float) -> list[dict[str, Any]]:
    """One rank: the buckets DataParallel cuts :class:`ToyNet` into, in launch order."""
    model = ToyNet()
    dp = DataParallel(model, "overlapped", bucket_cap_mb)
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        {"bucket": b, "bytes": k.nbytes, "offsets": k.offsets,
         "names": [names[id(p)] for p in k.params]}
        for b, k in enumerate(dp.buckets)
    ]  # fmt: skip


def toy_buckets(bucket_cap_mb: float) -> list[dict[str, Any]]:
    """Chapter 2: the grader's buckets, as ``DataParallel`` builds them on one rank.

    One row per bucket, bucket 0 (the last layers' gradients) first: its index, its
    buffer's bytes, each parameter's offset into the buffer and the parameters' names.
    """
    return run_distributed(_describe_worker, 1, bucket_cap_mb, timeout_s=60)[0]


def _batch(step: int, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[rank * b, (rank + 1) * b)`` of step ``step``'s global batch."""
    gen = torch.Generator().manual_seed(100 + step)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=gen)  # (B, T+1)
    b = GLOBAL_BATCH // world_size
    rows = tokens[rank * b : (rank + 1) * b]
    return rows[:, :-1], rows[:, 1:]


class _WatchedWork:
    """The ``Work`` of a bucket's all-reduce; ``wait()`` inside backward is no overlap."""

    def __init__(self, work: Any, watch: _Watch, index: int) -> None:
        self._work, self._watch, self._index = work, watch, index

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        if self._watch.in_backward:
            raise AssertionError(
                f"no overlap: bucket {self._index}'s all-reduce was waited inside backward, "
                "so backward stood still until it finished; start it and return, leave the "
                "waiting to finish_gradient_synchronization"
            )
        return self._work.wait(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


class _Watch:
    """Checks each all-reduce the learner starts, then starts it (installed in the rank)."""

    def __init__(self, real: Any, names: dict[int, str]) -> None:
        self.real, self.names = real, names
        self.signature = inspect.signature(real)  # torch's: (tensor, op, group, async_op)
        self.dp: DataParallel | None = None  # set by bind(), once DataParallel is built
        self.launched: list[int] = []
        self.in_backward = False
        self.during_backward = 0  # buckets started while backward ran
        self.bad_op: Any = None  # a reduce op other than SUM, named if the values differ

    def bind(self, dp: DataParallel) -> None:
        self.dp = dp
        self.by_ptr = {k.buffer.data_ptr(): b for b, k in enumerate(dp.buckets)}

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        bound = self.signature.bind(*args, **kwargs)  # a TypeError as torch would raise it
        bound.apply_defaults()
        tensor, op = bound.arguments["tensor"], bound.arguments["op"]
        group, async_op = bound.arguments["group"], bound.arguments["async_op"]
        index = self.by_ptr.get(tensor.data_ptr()) if isinstance(tensor, torch.Tensor) else None
        if index is None:
            raise AssertionError(
                "all_reduce got a tensor that is no bucket's buffer: all-reduce "
                "bucket.buffer, the flat copy of the bucket's gradients"
            )
        if (dist.group.WORLD if group is None else group) is not self.dp.group:
            raise AssertionError(
                f"bucket {index}'s all-reduce ran on another process group than "
                "DataParallel's (the default group when none is given): pass "
                "group=state.group, or call state.all_reduce"
            )
        self._check_order(index)
        self._check_full(index)
        if isinstance(op, bool):
            raise AssertionError(
                f"bucket {index}'s all-reduce got op={op}: torch's all_reduce takes (tensor, "
                "op, group, async_op), so a second positional argument is the op; pass "
                "async_op=True by name"
            )
        if not async_op:
            raise AssertionError(
                f"bucket {index}'s all-reduce is blocking: start it with async_op=True and "
                "keep its Work in bucket.work, so backward goes on while it runs"
            )
        if op != dist.ReduceOp.SUM:
            self.bad_op = op
            if op in (dist.ReduceOp.AVG, dist.ReduceOp.PREMUL_SUM):
                raise AssertionError(
                    f"bucket {index}'s all-reduce uses op={getattr(op, 'name', op)}: leave op "
                    "at SUM, finish_gradient_synchronization divides the sum by N"
                )
        self.launched.append(index)
        self.during_backward += self.in_backward
        return _WatchedWork(self.real(*bound.args, **bound.kwargs), self, index)

    def _check_order(self, index: int) -> None:
        if index < len(self.launched):
            raise AssertionError(
                f"bucket {index} started twice in one step: advance state.next_bucket past "
                "each bucket you start, and start from state.next_bucket"
            )
        if index > len(self.launched):
            raise AssertionError(
                f"bucket {index} started before bucket {len(self.launched)}: start the "
                "buckets in index order, from state.next_bucket, and stop at the first one "
                "that is not full (every rank must start them in the same order, or the "
                "all-reduces pair up wrongly)"
            )

    def _check_full(self, index: int) -> None:
        bucket = self.dp.buckets[index]
        for i, p in enumerate(bucket.params):
            if i not in bucket.ready:
                raise AssertionError(
                    f"bucket {index} started before the gradient of {self.names[id(p)]!r} "
                    "was in it: start a bucket only when all its parameters are ready"
                )
        self.check_slices(index)

    def check_slices(self, index: int) -> None:
        """The buffer holds each ready parameter's gradient (zeros for none) at its offset."""
        bucket = self.dp.buckets[index]
        ready = [
            (i, p, start, p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel()))
            for i, (p, start) in enumerate(zip(bucket.params, bucket.offsets, strict=True))
            if i in bucket.ready
        ]
        wrong = [
            (i, p, start, want)
            for i, p, start, want in ready
            if not torch.equal(bucket.buffer[start : start + p.numel()], want)
        ]
        if not wrong:
            return
        i, p, start, want = wrong[0]
        name = self.names[id(p)]
        got = bucket.buffer[start : start + p.numel()]
        scaled = _scaling(got, want, self.dp.world_size)
        if scaled is not None:
            raise AssertionError(
                f"bucket {index}: the slot of {name!r} holds its gradient {scaled}: copy "
                "p.grad as it is; finish_gradient_synchronization divides the sum by N"
            )
        for i, p, start, want in wrong:  # a gradient copied whole, at another offset?
            at = _find(bucket.buffer, want)
            if at is not None:
                raise AssertionError(
                    f"bucket {index}: the gradient of {self.names[id(p)]!r} sits at offset "
                    f"{at} of the buffer, but its slot starts at bucket.offsets[{i}] = {start}: "
                    "copy p.grad into bucket.buffer[offset : offset + p.numel()], offset = "
                    "bucket.offsets[i]"
                )
        raise AssertionError(
            f"bucket {index}: a wrong slice for {name!r}: copy p.grad (flattened) into "
            "bucket.buffer[offset : offset + p.numel()], offset = bucket.offsets[i]"
        )

    def after_call(self, what: str) -> None:
        """After the learner's function returns: ``next_bucket`` advanced, Works stored."""
        dp = self.dp
        started = len(self.launched)
        if dp.next_bucket != started:
            then = (
                f"bucket {dp.next_bucket} would be started twice in one step"
                if dp.next_bucket < started
                else f"bucket {started} would never be started"
            )
            raise AssertionError(
                f"after {what}, state.next_bucket is {dp.next_bucket} but {started} "
                f"bucket(s) were started in this step, so {then}: advance state.next_bucket "
                "past each bucket you start (it is the first bucket not started yet)"
            )
        for b in self.launched:
            if not isinstance(dp.buckets[b].work, _WatchedWork):
                raise AssertionError(
                    f"bucket {b} was started but bucket.work is {dp.buckets[b].work!r}: store "
                    "the Work that all_reduce returns in bucket.work (finish waits for it)"
                )

    def after_backward(self, step: int) -> None:
        """Every gradient backward produced is marked ready and copied; full buckets started."""
        for b, bucket in enumerate(self.dp.buckets):
            for i, p in enumerate(bucket.params):
                if p.grad is not None and i not in bucket.ready:
                    raise AssertionError(
                        f"step {step}: after backward, the gradient of {self.names[id(p)]!r} "
                        "is not marked ready: grad_ready must add its index i to bucket.ready"
                    )
            if b >= len(self.launched):  # started buckets were checked when they started
                self.check_slices(b)
        full = 0  # leading buckets with every gradient in
        for bucket in self.dp.buckets:
            if len(bucket.ready) < len(bucket.params):
                break
            full += 1
        if self.during_backward < full:
            raise AssertionError(
                f"step {step}: {full} bucket(s) were full during backward but only "
                f"{self.during_backward} started then: grad_ready must call "
                "launch_ready_buckets, which starts each bucket as soon as it is full "
                "(that is the overlap)"
            )


def _scaling(got: torch.Tensor, want: torch.Tensor, n: int) -> str | None:
    """``got`` as ``want`` scaled ("divided by the world size (n)", ...), or None."""
    norm = float(want @ want)
    if norm == 0:
        return None
    scale = float(got @ want) / norm
    if abs(scale - 1) < 1e-6 or not torch.allclose(got, scale * want, rtol=1e-5, atol=1e-8):
        return None
    return f"divided by the world size ({n})" if abs(scale * n - 1) < 1e-4 else f"times {scale:.4g}"


def _find(buffer: torch.Tensor, want: torch.Tensor) -> int | None:
    """The first offset of ``buffer`` where ``want`` (not all zeros) lies whole, or None."""
    if buffer.numel() < want.numel() or not bool(want.any()):
        return None
    windows = buffer.unfold(0, want.numel(), 1)  # (positions, numel)
    found = (windows == want).all(dim=1).nonzero().flatten().tolist()
    return found[0] if found else None


def _grad_ready_checked(grad_ready: Any, watch: _Watch, state: DataParallel, p: Any) -> None:
    """The hook's call of the learner's ``grad_ready``, then the watch's checks."""
    grad_ready(state, p)
    watch.after_call("grad_ready")


def _launch_in_finish(launch: Any, watch: _Watch, state: DataParallel) -> None:
    """``finish_gradient_synchronization``'s call, every gradient in: all buckets must start."""
    launch(state)
    watch.after_call("launch_ready_buckets")
    if len(watch.launched) < len(state.buckets):
        raise AssertionError(
            f"with every gradient in, launch_ready_buckets started {len(watch.launched)} of "
            f"{len(state.buckets)} buckets: start every full bucket, in index order, "
            "advancing state.next_bucket"
        )


def _compare(model: nn.Module, ref: nn.Module, what: str, step: int) -> list[str]:
    """Messages naming every parameter (or gradient) that differs from the reference."""
    errors = []
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        got, want = (p.grad, q.grad) if what == "gradient" else (p.detach(), q.detach())
        if what == "gradient" and not p.requires_grad:
            if got is not None:
                errors.append(f"step {step}: frozen {name!r} got a gradient; leave it alone")
            continue
        got = torch.zeros_like(p) if got is None else got
        want = torch.zeros_like(q) if want is None else want
        if not torch.allclose(got, want, rtol=RTOL, atol=ATOL):
            err = float((got - want).abs().max())
            errors.append(f"step {step}: {what} of {name!r} differs (max abs error {err:.3g})")
    return errors


def _grade_worker(ctx, case: Case, group, cwd: str, module_name: str, caps: list[float], steps):
    """One member rank: for each cap, ``steps`` SGD steps of DataParallel running the hook."""
    learner = import_learner(cwd, module_name)
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    real = dist.all_reduce
    buckets = []
    for cap in caps:
        torch.manual_seed(0)
        model = ToyNet()
        torch.manual_seed(0)
        ref = ToyNet()
        watch = _Watch(real, {id(p): n for n, p in model.named_parameters()})
        dp = DataParallel(
            model, "overlapped", cap, group=group,
            grad_ready=functools.partial(_grad_ready_checked, learner.grad_ready, watch),
            launch_ready_buckets=functools.partial(
                _launch_in_finish, learner.launch_ready_buckets, watch),
        )  # fmt: skip
        watch.bind(dp)
        size_of = f"{cap * 2**20:.0f} bytes" if cap < 2**-10 else f"{cap:g} MB"
        where = f"buckets of at most {size_of} ({len(dp.buckets)} buckets)"
        # The learner calls dist.all_reduce (or state.all_reduce, which calls it): watch it,
        # also where the learner's module imported it by name.
        own = getattr(learner, "all_reduce", None)
        dist.all_reduce = dist.distributed_c10d.all_reduce = watch
        if own is real:
            learner.all_reduce = watch
        opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, ref))
        try:
            for step in range(steps):
                opt.zero_grad(set_to_none=True)
                watch.in_backward, watch.launched, watch.during_backward = True, [], 0
                try:
                    dp(*_batch(step, rank, size)).backward()
                finally:
                    watch.in_backward = False
                watch.after_backward(step)
                dp.finish_gradient_synchronization()  # calls the learner's launch_ready_buckets
                ref_opt.zero_grad(set_to_none=True)
                ref(*_batch(step, 0, 1)).backward()
                errors = _compare(model, ref, "gradient", step)
                opt.step()
                ref_opt.step()
                errors = errors or _compare(model, ref, "parameter", step)
                if errors:
                    if watch.bad_op is not None:
                        op = getattr(watch.bad_op, "name", watch.bad_op)
                        hint = "finish_gradient_synchronization divides the sum by N"
                        errors.insert(0, f"the all-reduce used op={op}: leave op at SUM, {hint}")
                    raise AssertionError(f"{where}: " + "; ".join(errors[:3]))
        finally:
            dist.all_reduce = dist.distributed_c10d.all_reduce = real
            if own is real:
                learner.all_reduce = real
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        everyone = [torch.empty_like(flat) for _ in range(size)]
        dist.all_gather(everyone, flat, group=group)
        if not all(torch.equal(t, everyone[0]) for t in everyone):
            raise AssertionError(f"{where}: the ranks' parameters are not bitwise equal")
        buckets.append(len(dp.buckets))
    return buckets


def grade_bucket_hook(
    module_name: str,
    bucket_caps_mb: list[float] | None = None,
    steps: int = 2,
    cases: tuple[Case, ...] | list[Case] | None = None,
    *,
    world_size: int | None = None,
) -> None:
    """Chapter 2's graded exercise: ``module_name.grad_ready`` / ``launch_ready_buckets``.

    Runs ``steps`` SGD steps of :class:`ToyNet` wrapped in ``DataParallel`` (overlapped,
    on the case's group, the learner's two functions injected) for each bucket cap
    (default: 100 bytes, smaller than the largest parameter, and 25 MB, one bucket) on
    each case (default :data:`CASES`; ``world_size=n`` alone grades ``Case(n)`` only),
    watching every all-reduce the learner starts, and compares every gradient and
    parameter with the single-device reference. A wrong attempt raises an
    ``AssertionError`` whose message names the mistake; a stub, ``NotImplementedError``.
    """
    caps = list(bucket_caps_mb or DEFAULT_CAPS_MB)
    if cases is None:
        cases = CASES if world_size is None else (Case(world_size),)
    results = grade(
        _grade_worker, cases, os.getcwd(), module_name, caps, steps,
        what="the bucket hook", module_name=module_name, hang_hint=HANG_HINT,
    )  # fmt: skip
    shown = ", ".join(str(n) for n in results[0][1][0])
    where = " and ".join(case.describe() for case, _ in results)
    print(f"OK: {module_name} matches the single device {where} ({shown} buckets)")
