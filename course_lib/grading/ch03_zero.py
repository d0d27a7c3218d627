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

``zero`` is the ZeroRedundancyOptimizer itself. The grader builds one over a small model
with two parameter groups (weights with weight decay, biases without; sizes that no N
divides, so the flat buffers are padded) with the learner's functions injected, as
chapter 4's grader injects ``server_round``, and trains it as chapter 3 does
(``finish_gradient_synchronization`` then ``step``) on each rank's slice of the global
batch. Beside it the same model trains on the whole batch with the plain optimizer.
First the bytes each rank sends are checked, then every parameter, by name, on every
rank, after every step.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib import collectives as C
from course_lib.grading.core import ATOL, RTOL, import_learner, stub_error
from course_lib.launch import RankError, run_distributed
from course_lib.parallel.zero import ZeroRedundancyOptimizer

IN, HIDDEN, OUT = 3, 7, 4  # weights 3*7 + 7*4 = 49, biases 7 + 4 = 11: divisible by no N in 2..5
GLOBAL_BATCH = 12  # rows of the global batch: divisible by 1, 2, 3 and 4 ranks
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
}


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


def _named(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _zero1_worker(ctx, cwd: str, module_name: str, optim: str, steps: int) -> dict:
    """One rank: ZeroRedundancyOptimizer with the learner's functions, beside one device."""
    torch.set_num_threads(1)
    learner = import_learner(cwd, module_name)
    optimizer_class, kwargs = OPTIMIZERS[optim]
    torch.manual_seed(0)
    model, ref = GradedModel(), GradedModel()
    ref.load_state_dict(model.state_dict())
    counter = C.CommCounter()
    zero = ZeroRedundancyOptimizer(
        _groups(model), optimizer_class, stage=1, counter=counter, module=model,
        reduce_scatter_gradients=learner.reduce_scatter_gradients,
        step_and_all_gather=learner.step_and_all_gather, **kwargs,
    )  # fmt: skip
    ref_opt = optimizer_class(_groups(ref), **kwargs)
    b = GLOBAL_BATCH // ctx.world_size
    history, sent = [_named(ref)], []
    for step in range(steps):
        x, y = _batch(step)
        mine = slice(ctx.rank * b, (ctx.rank + 1) * b)
        zero.zero_grad()
        F.mse_loss(model(x[mine]), y[mine]).backward()
        counter.reset()
        zero.finish_gradient_synchronization()  # the learner's reduce_scatter_gradients
        zero.step()  # the learner's step_and_all_gather
        sent.append(counter.bytes_sent)
        ref_opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        ref_opt.step()
        history.append((_named(model), _named(ref)))
    dist.barrier()
    padded = sum(fg.layout.padded for fg in zero.flat_groups)
    return {"history": history, "sent": sent, "padded_bytes": padded * 4}


def _hint(got: torch.Tensor, want: torch.Tensor, before: torch.Tensor, n: int) -> str:
    """What a wrong update looks like: no update, N times too large, or by how much."""
    moved, should = (got - before).flatten(), (want - before).flatten()
    if moved.abs().max() == 0:
        return (
            "it did not move: set fg.shard.grad to the mean gradient of our piece, then "
            "step zero.optimizer (it was built on the shards)"
        )
    ratio = float(moved @ should / (should @ should).clamp_min(1e-30))
    if abs(ratio - n) < 0.1 * n:
        return f"the update is about {n}x too large: divide the reduce-scattered sum by N"
    return f"the update is {ratio:.3f} times the expected one"


def _check(results: list[dict], world_size: int, optim: str) -> None:
    """AssertionError naming the first (step, rank, parameter) that differs."""
    for step in range(1, len(results[0]["history"])):
        for rank, res in enumerate(results):
            ours, ref = res["history"][step]
            before = res["history"][0] if step == 1 else res["history"][step - 1][1]
            for name, expected in ref.items():
                got = ours[name]
                if not torch.allclose(got, expected, rtol=RTOL, atol=ATOL):
                    diff = (got - expected).abs().flatten()
                    i = int(diff.argmax())
                    g, e = got.flatten()[i].item(), expected.flatten()[i].item()
                    hint = _hint(got, expected, before[name], world_size)
                    raise AssertionError(
                        f"{optim}, N={world_size}: after step {step}, rank {rank}'s "
                        f"parameter {name!r} differs from the single-device model by up to "
                        f"{diff[i].item():.3g} (element {i}: got {g:.6g}, expected "
                        f"{e:.6g}): {hint}"
                    )
            first = results[0]["history"][step][0]
            for name, value in ours.items():
                if not torch.equal(value, first[name]):
                    raise AssertionError(
                        f"{optim}, N={world_size}: after step {step}, rank {rank}'s "
                        f"{name!r} is not bitwise equal to rank 0's: did every rank all-gather?"
                    )


def _check_bytes(results: list[dict], world_size: int) -> None:
    """Each rank must send 2(N-1)/N of the buffers: one reduce-scatter plus one all-gather."""
    padded = results[0]["padded_bytes"]
    one = (world_size - 1) * padded // world_size  # one ring collective over every buffer
    for rank, res in enumerate(results):
        got = res["sent"][-1]
        if got == 2 * one:
            continue
        if got == 0:
            hint = "nothing was counted: pass zero.counter to C.ring_reduce_scatter and "
            hint += "C.ring_all_gather"
        elif got == one:
            hint = "one collective's worth: a move is missing, or went through "
            hint += "torch.distributed, which this counter does not see; use C.ring_*"
        elif got == 3 * one:
            hint = "an all-reduce in place of the reduce-scatter sends 2(N-1)/N alone; "
            hint += "each rank needs only the sum of its own piece"
        else:
            hint = "use C.ring_reduce_scatter and C.ring_all_gather with zero.counter, "
            hint += "once per flat group"
        raise AssertionError(
            f"N={world_size}: rank {rank} sent {got} bytes in a step, expected "
            f"2(N-1)/N x {padded} = {2 * one}: {hint}"
        )


def grade_zero1_step(
    module_name: str, world_size: int = 2, optim: str = "sgd", steps: int = 3
) -> None:
    """Chapter 3's graded exercise: the learner's ZeRO-1 step on ``world_size`` ranks.

    Runs ``ZeroRedundancyOptimizer`` (stage 1) with ``module_name.reduce_scatter_gradients``
    and ``module_name.step_and_all_gather`` injected. ``optim`` is "sgd" (momentum 0.9,
    weight decay) or "adamw". Prints OK, or raises AssertionError naming the step, the
    rank and the parameter that differ.
    """
    try:
        results = run_distributed(
            _zero1_worker, world_size, os.getcwd(), module_name, optim, steps, timeout_s=90
        )
    except RankError as err:
        stub = stub_error(err, "the ZeRO-1 step", module_name)
        if stub is not None:
            raise stub from None
        raise
    _check_bytes(results, world_size)
    _check(results, world_size, optim)
    sent = results[0]["sent"][-1]
    print(
        f"OK: {module_name} inside ZeroRedundancyOptimizer matches single-device {optim} on "
        f"{world_size} ranks for {steps} steps, every parameter on every rank; each rank "
        f"sent {sent} bytes per step = 2(N-1)/N of the {results[0]['padded_bytes']}-byte "
        "flat buffers"
    )
