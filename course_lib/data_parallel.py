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
  communication runs while backward computes the earlier layers.

In every mode, call :meth:`DataParallel.finish_gradient_synchronization` after
``backward()`` and before the optimizer step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from course_lib import collectives as C
from course_lib.model import GPT, GPTConfig
from course_lib.train import Strategy, TrainConfig, build_model, make_optimizer, set_lr

if TYPE_CHECKING:
    from course_lib.launch import DistContext

MODES = ("naive", "bucketed", "overlapped")


def check_same_model(module: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Chapter 2: raise ValueError on every rank unless every rank wraps the same model.

    Compares the parameter count, then each parameter's name and shape, and names the
    first mismatch. Every rank sees every rank's description, so all raise together.
    """
    mine = [(name, tuple(p.shape)) for name, p in module.named_parameters()]
    everyone: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    counts = [len(d) for d in everyone]
    if len(set(counts)) > 1:
        raise ValueError(
            f"ranks wrap different models: parameter tensors per rank {counts}; "
            "build the same model (same config) on every rank before wrapping"
        )
    for i, entries in enumerate(zip(*everyone, strict=True)):
        if len(set(entries)) > 1:
            per_rank = ", ".join(f"rank {r}: {n} {list(s)}" for r, (n, s) in enumerate(entries))
            raise ValueError(
                f"ranks wrap different models: parameter {i} differs ({per_rank}); "
                "build the same model (same config) on every rank before wrapping"
            )


@torch.no_grad()
def broadcast_module(module: nn.Module, src: int = 0, group: dist.ProcessGroup | None = None):
    """Chapter 2: copy rank ``src``'s parameters and buffers to every rank, in order."""
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src, group=group)


@dataclass
class Bucket:
    """Chapter 2: parameters whose gradients travel together in one flat all-reduce."""

    params: list[nn.Parameter]  # in the order their gradients fill the buffer
    offsets: list[int]  # where each parameter's gradient starts in ``buffer``
    buffer: torch.Tensor  # (numel,) flat gradients, the all-reduce's payload
    ready: set[int] = field(default_factory=set)  # indices into params whose grad is in
    work: dist.Work | None = None  # the in-flight asynchronous all-reduce, if any

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
        offsets = [0]
        for p in group[:-1]:
            offsets.append(offsets[-1] + p.numel())
        numel = offsets[-1] + group[-1].numel()
        buffer = torch.zeros(numel, dtype=group[0].dtype, device=group[0].device)  # (numel,)
        buckets.append(Bucket(group, offsets, buffer))
    return buckets


class DataParallel(nn.Module):
    """Chapter 2: data parallelism from scratch, in the spirit of DistributedDataParallel.

    ``mode`` is one of :data:`MODES`. Parameters with ``requires_grad=False`` are never
    communicated. With ``find_unused_parameters=True`` a parameter that no rank used in
    the step keeps ``grad=None`` (as on one device), at the price of one small extra
    all-reduce per step; otherwise it gets a zero gradient. ``ring=True`` (naive and
    bucketed only) all-reduces with chapter 1's ring and counts bytes in ``counter``.
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
        self.module, self.mode, self.group = module, mode, group
        self.world_size = dist.get_world_size(group)
        self.find_unused_parameters, self.ring, self.counter = find_unused_parameters, ring, counter
        self.require_sync = True  # False inside no_sync(): gradients only accumulate
        check_same_model(module, group)
        broadcast_module(module, 0, group)
        # Backward produces gradients roughly from the last layer to the first.
        trainable = [p for p in module.parameters() if p.requires_grad]
        self.params = trainable
        self.buckets = make_buckets(list(reversed(trainable)), bucket_cap_mb)
        self._where = {
            id(p): (b, i) for b, k in enumerate(self.buckets) for i, p in enumerate(k.params)
        }
        self._next_bucket = 0  # buckets start in index order on every rank
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

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Chapter 2: gradients accumulate locally; the next synced backward averages them all."""
        previous, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = previous

    # -- communication -------------------------------------------------------------------

    def _all_reduce(self, tensor: torch.Tensor, async_op: bool = False) -> dist.Work | None:
        """Sum ``tensor`` over the group in place (ours if ``ring``, else torch's)."""
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
        """Start, in index order, every bucket whose gradients are all in."""
        while self._next_bucket < len(self.buckets):
            bucket = self.buckets[self._next_bucket]
            if len(bucket.ready) < len(bucket.params):
                return
            bucket.work = self._all_reduce(bucket.buffer, async_op=True)
            if self.timeline is not None and bucket.work is not None:
                self._record(self._next_bucket, bucket)
            self._next_bucket += 1

    def _record(self, index: int, bucket: Bucket) -> None:
        """Append (bucket, bytes, launch time, done time) to the timeline when it completes."""
        start = time.perf_counter()
        row = {"bucket": index, "bytes": bucket.nbytes, "start": start, "end": None}
        self.timeline.append(row)

        def done(fut: torch.futures.Future) -> None:
            row["end"] = time.perf_counter()

        bucket.work.get_future().then(done)

    def _grad_ready(self, p: nn.Parameter) -> None:
        """Overlapped mode's hook: runs inside backward once ``p.grad`` is complete."""
        if not self.require_sync:
            return
        b, i = self._where[id(p)]
        if b < self._next_bucket:
            raise RuntimeError(
                "a second backward before finish_gradient_synchronization(); "
                "accumulate micro-batches inside no_sync()"
            )
        bucket = self.buckets[b]
        self._fill(bucket, i)
        bucket.ready.add(i)
        self._launch_ready_buckets()

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
        had_grad = torch.tensor([p.grad is not None for p in self.params], dtype=torch.int32)
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
            self._all_reduce(p.grad)
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
        self._next_bucket = 0

    def reset_counters(self) -> None:
        """Chapter 2: zero the bytes and calls counted since the wrap (or the last reset)."""
        self.bytes_all_reduced = 0
        self.all_reduce_calls = 0


# ---------------------------------------------------------------------------------------
# The training loop's strategy: `python -m course_lib train --strategy dp`
# ---------------------------------------------------------------------------------------


def global_mean(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> float:
    """Chapter 2: the mean over ranks of a per-rank scalar (each rank's slice is equal)."""
    total = value.detach().reshape(1).to(torch.float64)
    dist.all_reduce(total, group=group)
    return total.item() / dist.get_world_size(group)


class DataParallelStrategy(Strategy):
    """Chapter 2: the reference step with the model wrapped in :class:`DataParallel`.

    Each rank draws its slice of the global batch; ``finish_gradient_synchronization``
    averages the gradients, so clipping and AdamW see the global batch's gradient and
    every rank takes the same step.
    """

    name = "dp"

    def __init__(
        self, ctx: DistContext | None = None, mode: str = "overlapped", bucket_cap_mb: float = 25.0
    ) -> None:
        super().__init__(ctx)
        self.mode, self.bucket_cap_mb = mode, bucket_cap_mb

    @property
    def data_rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def data_world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def setup(self, model_config: GPTConfig, train_config: TrainConfig, device: Any) -> None:
        if not dist.is_initialized():
            raise RuntimeError(
                "strategy 'dp' needs a process group: launch it with "
                "run_distributed, torchrun or --world-size N"
            )
        self.device = torch.device(device)
        self.train_config = train_config
        module = build_model(model_config, train_config.seed, self.device)
        self.model = DataParallel(module, self.mode, self.bucket_cap_mb)
        self.optimizer = make_optimizer(module, train_config)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        set_lr(self.optimizer, lr)
        self.model.train()
        _, loss = self.model(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.model.finish_gradient_synchronization()
        if self.train_config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_config.grad_clip)
        self.optimizer.step()
        return global_mean(loss)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        _, loss = self.model(x, y)
        return global_mean(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.module.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_model(self) -> GPT:
        return self.model.module
