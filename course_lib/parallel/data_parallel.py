"""Data parallelism from scratch: naive, bucketed and overlapped (chapter 2).

Every rank holds the whole model, runs forward and backward on its slice of the global
batch, and the ranks average their gradients before the optimizer step. Averaging is
exact: with B sequences cut into N equal slices, the full-batch gradient is the mean of
the N slice gradients, (1/B) sum_i g_i = (1/N) sum_r (N/B) sum_{i in slice r} g_i.

:class:`DataParallel` wraps a module with the interface of
``torch.nn.parallel.DistributedDataParallel`` where it makes sense (``.module``, forward
pass-through, ``no_sync()``), but every byte moves through calls you can read here:

- ``naive``: after backward, one all-reduce per gradient tensor (one latency per tensor);
- ``bucketed``: gradients copied into flat buckets of ``bucket_cap_mb``, one all-reduce
  per bucket (few latencies, same bytes);
- ``overlapped``: a hook on each parameter marks its gradient ready during backward; a
  bucket whose gradients are all ready starts its asynchronous all-reduce at once, so
  communication runs while backward computes the earlier layers. The hook's two halves,
  :func:`grad_ready` and :func:`launch_ready_buckets`, are chapter 2's graded exercise:
  ``DataParallel(..., grad_ready=..., launch_ready_buckets=...)`` runs the learner's.

In every mode, call :meth:`DataParallel.finish_gradient_synchronization` after
``backward()`` and before the optimizer step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from course_lib import collectives as C
from course_lib.flat import FlatLayout
from course_lib.model import GPT
from course_lib.parallel.common import (
    SyncSwitch,
    broadcast_module,
    check_same_model,
    require_member,
)
from course_lib.train import Strategy, TrainConfig, WholeModelSync, make_optimizer

if TYPE_CHECKING:
    from course_lib.launch import DistContext

MODES = ("naive", "bucketed", "overlapped")


@dataclass
class Bucket:
    """Chapter 2: parameters whose gradients travel together in one flat all-reduce."""

    params: list[nn.Parameter]  # in the order their gradients fill the buffer
    layout: FlatLayout  # where each parameter's gradient lies in ``buffer`` (one piece)
    buffer: torch.Tensor  # (numel,) flat gradients, the all-reduce's payload
    ready: set[int] = field(default_factory=set)  # indices into params whose grad is in
    work: dist.Work | None = None  # the in-flight asynchronous all-reduce, if any

    @property
    def offsets(self) -> list[int]:  # where each parameter's gradient starts in ``buffer``
        return self.layout.offsets

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def make_buckets(params: list[nn.Parameter], bucket_cap_mb: float) -> list[Bucket]:
    """Chapter 2: cut ``params`` (in backward order) into buckets of at most ``bucket_cap_mb``.

    Greedy: a bucket closes when the next gradient would overflow it, or has another
    dtype; a parameter larger than the cap gets a bucket of its own.
    """
    cap = bucket_cap_mb * 2**20
    groups: list[list[nn.Parameter]] = []
    size = 0.0
    for p in params:
        nbytes = p.numel() * p.element_size()
        if not groups or size + nbytes > cap or groups[-1][0].dtype != p.dtype:
            groups.append([])
            size = 0.0
        groups[-1].append(p)
        size += nbytes
    buckets = []
    for group in groups:
        layout = FlatLayout([p.shape for p in group], rank=0, world_size=1)
        buffer = torch.zeros(layout.numel, dtype=group[0].dtype, device=group[0].device)
        buckets.append(Bucket(group, layout, buffer))  # buffer: (numel,)
    return buckets


def launch_ready_buckets(dp: DataParallel) -> None:
    """Chapter 2 (the graded exercise): start, in index order, every bucket whose gradients are in.

    Each start is an asynchronous all-reduce whose ``Work`` goes into ``bucket.work``; the
    first bucket not yet full stops the loop, so every rank starts the same buckets in
    the same order (their all-reduces pair up by order, not by name).
    """
    while dp.next_bucket < len(dp.buckets):
        bucket = dp.buckets[dp.next_bucket]
        if len(bucket.ready) < len(bucket.params):
            return  # a later bucket may be full, but it must wait its turn
        bucket.work = dp.all_reduce(bucket.buffer, async_op=True)
        dp.next_bucket += 1


def grad_ready(dp: DataParallel, p: nn.Parameter) -> None:
    """Chapter 2 (the graded exercise): overlapped mode's hook, once ``p.grad`` is complete.

    Copy the gradient into its slot of its bucket's flat buffer, mark it ready, then
    start whatever buckets are now full.
    """
    b, i = dp.where[id(p)]
    bucket = dp.buckets[b]
    start = bucket.offsets[i]
    bucket.buffer[start : start + p.numel()].copy_(p.grad.reshape(-1))  # (numel_p,)
    bucket.ready.add(i)
    launch_ready_buckets(dp)


GradReady = Callable[["DataParallel", nn.Parameter], None]  # grad_ready's signature
Launch = Callable[["DataParallel"], None]  # launch_ready_buckets' signature


class DataParallel(WholeModelSync, SyncSwitch, nn.Module):
    """Chapter 2: data parallelism from scratch, in the spirit of DistributedDataParallel.

    ``mode`` is one of :data:`MODES`. Parameters with ``requires_grad=False`` are never
    communicated. With ``find_unused_parameters=True`` a parameter that no rank used in
    the step keeps ``grad=None`` (as on one device), at the price of one small extra
    all-reduce per step; otherwise it gets a zero gradient. ``ring=True`` (naive and
    bucketed only) all-reduces with chapter 1's ring and counts bytes in ``counter``.
    ``grad_ready`` and ``launch_ready_buckets`` replace :func:`grad_ready` and
    :func:`launch_ready_buckets` (the exercise's grader passes the learner's); both take
    this DataParallel as their first argument.
    """

    def __init__(
        self,
        module: nn.Module,
        mode: str = "overlapped",
        bucket_cap_mb: float = 25.0,
        group: dist.ProcessGroup | None = None,
        find_unused_parameters: bool = False,
        ring: bool = False,
        counter: C.CommCounter | None = None,
        *,
        grad_ready: GradReady = grad_ready,
        launch_ready_buckets: Launch = launch_ready_buckets,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb={bucket_cap_mb} must be > 0, e.g. 25 (torch's DDP)")
        if ring and mode == "overlapped":
            raise ValueError(
                "ring=True runs chapter 1's blocking ring: use mode 'naive' or "
                "'bucketed' with it, or ring=False for 'overlapped'"
            )
        # No group: the whole world, named explicitly (strategies pass their Topology's).
        self.group = group if group is not None else dist.group.WORLD
        require_member(self.group, "DataParallel")
        self.module, self.mode = module, mode
        self.world_size = dist.get_world_size(self.group)
        self.find_unused_parameters, self.ring, self.counter = find_unused_parameters, ring, counter
        self.require_sync = True  # False inside no_sync(): gradients only accumulate
        self.grad_ready_fn, self.launch_fn = grad_ready, launch_ready_buckets
        check_same_model(module, self.group)
        broadcast_module(module, self.group)
        # Backward produces gradients roughly from the last layer to the first.
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.params = trainable
        self.buckets = make_buckets(list(reversed(trainable)), bucket_cap_mb)
        # id(p) -> (bucket index, index of p in the bucket)
        self.where = {
            id(p): (b, i) for b, k in enumerate(self.buckets) for i, p in enumerate(k.params)
        }
        self.next_bucket = 0  # the first bucket not started in this step (index order)
        self.bytes_all_reduced = 0  # payload handed to all-reduce since the last reset
        self.all_reduce_calls = 0
        # With a list here, each bucket's all-reduce appends its launch and completion time
        # (time.perf_counter): chapter 2's overlap timeline.
        self.timeline: list[dict[str, Any]] | None = None
        if mode == "overlapped":
            for p in trainable:
                p.register_post_accumulate_grad_hook(self._grad_ready)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    # -- communication -------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> dist.Work | None:
        """Chapter 2: sum ``tensor`` over the group in place (ours if ``ring``, else torch's).

        Counts the payload and the call. Returns torch's ``Work`` when ``async_op``
        (``None`` with the ring, which is blocking).
        """
        self.bytes_all_reduced += tensor.numel() * tensor.element_size()
        self.all_reduce_calls += 1
        if self.ring:
            C.ring_all_reduce(tensor, self.group, self.counter)
            return None
        return dist.all_reduce(tensor, group=self.group, async_op=async_op)

    def _fill(self, bucket: Bucket, i: int) -> None:
        """Copy parameter ``i``'s gradient (zeros if it has none) into the bucket buffer."""
        p, start = bucket.params[i], bucket.offsets[i]
        view = bucket.buffer[start : start + p.numel()]  # (numel_p,)
        if p.grad is None:
            view.zero_()
        else:
            view.copy_(p.grad.reshape(-1))

    def _launch_ready_buckets(self) -> None:
        """Start, in index order, every full bucket (``launch_ready_buckets``)."""
        self._timed(self.launch_fn)

    def _timed(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(self, *args)`` (the library's or the learner's); time the buckets it starts."""
        first = self.next_bucket
        fn(self, *args)
        if self.timeline is not None:
            for b in range(first, self.next_bucket):
                if self.buckets[b].work is not None:
                    self._record(b, self.buckets[b])

    def _record(self, index: int, bucket: Bucket) -> None:
        """Append (bucket, bytes, launch time, done time) to the timeline when it completes."""
        start = time.perf_counter()
        row = {"bucket": index, "bytes": bucket.nbytes, "start": start, "end": None}
        self.timeline.append(row)

        def done(fut: torch.futures.Future) -> None:
            row["end"] = time.perf_counter()

        bucket.work.get_future().then(done)

    def _grad_ready(self, p: nn.Parameter) -> None:
        """Overlapped mode's hook, inside backward once ``p.grad`` is complete: ``grad_ready``."""
        if not self.require_sync:
            return
        if self.where[id(p)][0] < self.next_bucket:
            raise RuntimeError(
                "a second backward before finish_gradient_synchronization(); "
                "accumulate micro-batches inside no_sync()"
            )
        self._timed(self.grad_ready_fn, p)

    def _used_mask(self, used: torch.Tensor) -> torch.Tensor:
        """Which trainable parameters SOME rank has a gradient for (one tiny all-reduce)."""
        dist.all_reduce(used, group=self.group)
        return used > 0

    @torch.no_grad()
    def finish_gradient_synchronization(self) -> None:
        """Chapter 2: after backward, leave every rank with the gradients averaged over ranks.

        Naive: one blocking all-reduce per gradient. Bucketed: fill each bucket, one
        all-reduce each. Overlapped: start the buckets backward did not (a parameter got
        no gradient), then wait for all. Then divide by N and copy back into ``p.grad``.
        """
        if not self.require_sync:
            raise RuntimeError(
                "finish_gradient_synchronization() inside no_sync(): call it "
                "after the backward that runs outside no_sync()"
            )
        had_grad = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32,
                                device=self.params[0].device if self.params else "cpu")  # fmt: skip
        if self.mode == "naive":
            self._naive()
        else:
            for bucket in self.buckets:
                if self.mode == "bucketed":
                    bucket.ready.clear()
                for i in range(len(bucket.params)):
                    if i not in bucket.ready:
                        self._fill(bucket, i)
                        bucket.ready.add(i)
            self._launch_ready_buckets()  # every bucket is in flight from here
        # Issued after all buckets, so every rank runs its collectives in the same order.
        used = self._used_mask(had_grad) if self.find_unused_parameters else None
        if self.mode != "naive":
            self._unpack_buckets()
        if used is not None:
            for p, u in zip(self.params, used.tolist(), strict=True):
                if not u:
                    p.grad = None

    def _naive(self) -> None:
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.all_reduce(p.grad)
            p.grad.div_(self.world_size)

    def _unpack_buckets(self) -> None:
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
            bucket.buffer.div_(self.world_size)
            for p, start in zip(bucket.params, bucket.offsets, strict=True):
                averaged = bucket.buffer[start : start + p.numel()].view_as(p)
                if p.grad is None:
                    p.grad = averaged.clone()
                else:
                    p.grad.copy_(averaged)
            bucket.ready.clear()
            bucket.work = None
        self.next_bucket = 0

    def reset_counters(self) -> None:
        """Chapter 2: zero the bytes and calls counted since the wrap (or the last reset)."""
        self.bytes_all_reduced = 0
        self.all_reduce_calls = 0

    # -- the GradientSync interface: the rest comes from WholeModelSync -------------------

    def writes_checkpoint(self) -> bool:
        """Replicated: the group's first rank writes the checkpoint, the others nothing."""
        return dist.get_rank(self.group) == 0


# ---------------------------------------------------------------------------------------
# The training loop's strategy: `python -m course_lib train --strategy dp`
# ---------------------------------------------------------------------------------------


class DataParallelStrategy(Strategy):
    """Chapter 2, ``--strategy dp``: the reference step with the model in :class:`DataParallel`.

    Each rank draws its slice of the global batch; ``finish_gradient_synchronization``
    averages the gradients over the topology's data-parallel group, so clipping and AdamW
    see the global batch's gradient and every rank takes the same step.
    """

    name = "dp"

    def __init__(
        self, ctx: DistContext | None = None, mode: str = "overlapped", bucket_cap_mb: float = 25.0
    ) -> None:
        super().__init__(ctx)
        self.mode, self.bucket_cap_mb = mode, bucket_cap_mb

    def wrap(self, module: GPT, cfg: TrainConfig):
        dp = DataParallel(module, self.mode, self.bucket_cap_mb, group=self.topology.dp_group)
        return dp, make_optimizer(module, cfg), dp
