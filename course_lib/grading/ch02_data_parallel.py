"""Chapter 2's grader: the learner's bucketed gradient hook inside DataParallel, vs one device.

The learner writes, in a module of their own (``%%writefile my_buckets.py``), the two
functions that :class:`course_lib.parallel.data_parallel.DataParallel` runs in overlapped
mode (the library's are :func:`~course_lib.parallel.data_parallel.grad_ready` and
:func:`~course_lib.parallel.data_parallel.launch_ready_buckets`):

- ``grad_ready(state, p)``: runs inside backward once ``p.grad`` is complete; copies it
  into its slot of its bucket, marks it ready, then calls ``launch_ready_buckets``;
- ``launch_ready_buckets(state)``: starts, in index order, the asynchronous all-reduce of
  every bucket whose gradients are all in, and stores the ``Work`` in ``bucket.work``.

``state`` is the DataParallel itself. The grader wraps its toy model in
``DataParallel(model, "overlapped", cap, grad_ready=..., launch_ready_buckets=...)`` with
the learner's functions injected, as chapter 4's grader injects ``server_round``: the
library's hook calls ``grad_ready`` during backward and its
``finish_gradient_synchronization`` calls ``launch_ready_buckets`` once every gradient
is in. The grader watches every all-reduce the learner starts and compares every
gradient and parameter with the single-device reference, naming the one that differs.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib.grading.core import ATOL, RTOL, import_learner, stub_error
from course_lib.launch import RankError, run_distributed
from course_lib.parallel.data_parallel import DataParallel

VOCAB, WIDTH, HIDDEN = 11, 6, 13  # odd sizes on purpose
GLOBAL_BATCH, SEQ = 12, 5  # 12 sequences: divisible by 1, 2, 3 and 4 ranks


class ToyNet(nn.Module):
    """Chapter 2's grading model: tied weights, a frozen layer, an unused layer, odd sizes."""

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


class _Watch:
    """Checks each all-reduce the learner starts, then starts it (installed in the rank)."""

    def __init__(self, real: Any, names: dict[int, str]) -> None:
        self.real, self.names = real, names
        self.dp: DataParallel | None = None  # set by bind(), once DataParallel is built
        self.launched: list[int] = []
        self.in_backward = False
        self.during_backward = 0  # buckets started while backward ran

    def bind(self, dp: DataParallel) -> None:
        self.dp = dp
        self.by_ptr = {k.buffer.data_ptr(): b for b, k in enumerate(dp.buckets)}

    def __call__(self, tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        index = self.by_ptr.get(tensor.data_ptr())
        if index is None:
            raise AssertionError("all_reduce got a tensor that is no bucket's buffer")
        if index < len(self.launched):
            raise AssertionError(
                f"bucket {index} started twice in one step: advance state.next_bucket "
                "past each bucket you start"
            )
        if index > len(self.launched):
            raise AssertionError(
                f"bucket {index} started before bucket {len(self.launched)}: every rank "
                "must start its buckets in index order, or the all-reduces pair up wrongly"
            )
        self._check_full(index)
        if not kwargs.get("async_op", False):
            raise AssertionError("start the all-reduce with async_op=True, so backward goes on")
        self.launched.append(index)
        self.during_backward += self.in_backward
        return self.real(tensor, *args, **kwargs)

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
        for i, (p, start) in enumerate(zip(bucket.params, bucket.offsets, strict=True)):
            if i not in bucket.ready:
                continue
            want = p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel())
            if not torch.equal(bucket.buffer[start : start + p.numel()], want):
                raise AssertionError(
                    f"bucket {index} holds a wrong slice for {self.names[id(p)]!r}: copy "
                    "p.grad into bucket.buffer[offset : offset + p.numel()], offset = "
                    "bucket.offsets[i]"
                )

    def after_backward(self, step: int) -> str | None:
        """Every gradient backward produced is marked ready and copied; full buckets started."""
        for b, bucket in enumerate(self.dp.buckets):
            for i, p in enumerate(bucket.params):
                if p.grad is not None and i not in bucket.ready:
                    return (
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
            return (
                f"step {step}: {full} bucket(s) were full during backward but only "
                f"{self.during_backward} started then: start each bucket as soon as "
                "it is full (that is the overlap)"
            )
        return None


def _launch_in_finish(launch: Any, watch: _Watch, state: DataParallel) -> None:
    """``finish_gradient_synchronization``'s call, every gradient in: all buckets must start."""
    launch(state)
    if len(watch.launched) < len(state.buckets):
        raise AssertionError(
            f"with every gradient in, launch_ready_buckets started buckets up to "
            f"{len(watch.launched) - 1} of {len(state.buckets)}: start every full bucket, "
            "in index order, advancing state.next_bucket"
        )
    for b, bucket in enumerate(state.buckets):
        if bucket.work is None:
            raise AssertionError(
                f"bucket {b} has no work after launch_ready_buckets with every gradient "
                "in: store the Work that all_reduce returns in bucket.work"
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


def _grade_worker(ctx, cwd: str, module_name: str, bucket_caps_mb: list[float], steps: int):
    """One rank: for each cap, ``steps`` SGD steps of DataParallel running the learner's hook."""
    learner = import_learner(cwd, module_name)
    real = dist.all_reduce
    report = []
    for cap in bucket_caps_mb:
        torch.manual_seed(0)
        model = ToyNet()
        torch.manual_seed(0)
        ref = ToyNet()
        watch = _Watch(real, {id(p): n for n, p in model.named_parameters()})
        launch = functools.partial(_launch_in_finish, learner.launch_ready_buckets, watch)
        dp = DataParallel(model, "overlapped", cap, grad_ready=learner.grad_ready,
                          launch_ready_buckets=launch)  # fmt: skip
        watch.bind(dp)
        dist.all_reduce = watch  # the learner calls dist.all_reduce (or dp.all_reduce): watch it
        if hasattr(learner, "all_reduce"):
            learner.all_reduce = watch
        opt, ref_opt = (torch.optim.SGD(m.parameters(), lr=0.5) for m in (model, ref))
        errors: list[str] = []
        try:
            for step in range(steps):
                opt.zero_grad(set_to_none=True)
                watch.in_backward, watch.launched, watch.during_backward = True, [], 0
                dp(*_batch(step, ctx.rank, ctx.world_size)).backward()
                watch.in_backward = False
                late = watch.after_backward(step)
                if late is not None and not errors:
                    errors.append(late)
                dp.finish_gradient_synchronization()  # calls the learner's launch_ready_buckets
                ref_opt.zero_grad(set_to_none=True)
                ref(*_batch(step, 0, 1)).backward()
                errors += _compare(model, ref, "gradient", step)
                opt.step()
                ref_opt.step()
                errors += _compare(model, ref, "parameter", step)
        finally:
            dist.all_reduce = real
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        everyone = [torch.empty_like(flat) for _ in range(ctx.world_size)]
        dist.all_gather(everyone, flat)
        if not all(torch.equal(t, everyone[0]) for t in everyone):
            errors.append("the ranks' parameters are not bitwise equal after the steps")
        report.append({"cap": cap, "buckets": len(dp.buckets), "errors": errors})
    return report


def _learner_error(err: RankError, fn_hint: str) -> Exception:
    """Turn a rank's traceback into the learner-facing error (its last line)."""
    stub = stub_error(err, "the bucket hook", fn_hint)
    if stub is not None:
        return stub
    tb = err.tracebacks.get(err.rank, "")
    lines = [ln for ln in tb.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else str(err)
    return AssertionError(f"rank {err.rank}: {last}")


def grade_bucket_hook(
    module_name: str, world_size: int = 2, bucket_caps_mb: list[float] | None = None, steps: int = 2
) -> None:
    """Chapter 2's graded exercise: ``module_name.grad_ready`` / ``launch_ready_buckets``.

    Runs ``steps`` SGD steps of :class:`ToyNet` wrapped in ``DataParallel`` (overlapped,
    the learner's two functions injected) on ``world_size`` ranks for each bucket cap
    (default: 100 bytes, smaller than the largest parameter, and 25 MB, one bucket) and
    compares every gradient and parameter with the single-device reference.
    """
    caps = bucket_caps_mb or [100 / 2**20, 25.0]
    try:
        reports = run_distributed(
            _grade_worker, world_size, os.getcwd(), module_name, caps, steps, timeout_s=90
        )
    except RankError as err:
        raise _learner_error(err, module_name) from None
    for rank, report in enumerate(reports):
        for case in report:
            if case["errors"]:
                raise AssertionError(
                    f"rank {rank}, bucket_cap_mb={case['cap']:.3g} "
                    f"({case['buckets']} buckets): " + "; ".join(case["errors"][:3])
                )
    shown = ", ".join(f"{c['buckets']} bucket(s)" for c in reports[0])
    print(f"OK: {module_name} matches the single device on {world_size} ranks ({shown})")
