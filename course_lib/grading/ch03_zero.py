"""Chapter 3's grader: the learner's ZeRO-1 optimizer step, on real ranks, vs one device.

The learner writes ``zero1_step(flat, grad, layout, optimizer, shard, group=None,
counter=None)`` in a module (``%%writefile``). On every rank the grader lays a small
model's parameters end to end in a flat buffer (:class:`course_lib.parallel.zero.FlatLayout`,
padded to a multiple of N, sizes chosen not to divide evenly), builds the inner
optimizer on this rank's piece only, and after each backward on the rank's slice of
the global batch calls the learner's step. Beside it the same model trains on the whole
global batch with the plain optimizer. After every step the parameters are compared,
by name, on every rank.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from course_lib import collectives as C
from course_lib.flat import FlatLayout
from course_lib.grading.core import ATOL, RTOL, import_learner, stub_error
from course_lib.launch import RankError, run_distributed

GLOBAL_BATCH = 12  # rows of the global batch: divisible by 1, 2, 3 and 4 ranks
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.01)),
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
}


class GradedModel(nn.Module):
    """A two-layer MLP with odd sizes (5 -> 7 -> 3): 64 parameters, divisible by neither 3 nor 5."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 7)
        self.out = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x)))  # (B, 3)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step``: inputs (B, 5) and targets (B, 3)."""
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 5, generator=gen), torch.randn(GLOBAL_BATCH, 3, generator=gen)


def _load(cwd: str, module_name: str, fn_name: str):
    return getattr(import_learner(cwd, module_name), fn_name)


def _zero1_worker(ctx, cwd, module_name, fn_name, optim, steps):
    """Runs on each rank: the learner's ZeRO-1 beside the single-device reference."""
    torch.set_num_threads(1)
    step_fn = _load(cwd, module_name, fn_name)
    optimizer_class, kwargs = OPTIMIZERS[optim]
    torch.manual_seed(0)
    model, ref = GradedModel(), GradedModel()
    ref.load_state_dict(model.state_dict())
    names = [name for name, _ in model.named_parameters()]
    params = list(model.parameters())
    layout = FlatLayout([p.shape for p in params], ctx.rank, ctx.world_size)
    flat = layout.flatten(params, params[0].detach())  # (padded,)
    for p, view in zip(params, layout.views(flat), strict=True):
        p.data = view  # the model's parameters now live in flat
    shard = nn.Parameter(layout.shard(flat))  # (padded / N,) a view of our piece
    optimizer = optimizer_class([shard], **kwargs)
    ref_opt = optimizer_class(ref.parameters(), **kwargs)
    b = GLOBAL_BATCH // ctx.world_size
    history, sent = [], []
    for step in range(steps):
        x, y = _batch(step)
        mine = slice(ctx.rank * b, (ctx.rank + 1) * b)
        for p in params:
            p.grad = None
        F.mse_loss(model(x[mine]), y[mine]).backward()
        grad = layout.flatten([p.grad for p in params], flat)  # (padded,) local gradient
        counter = C.CommCounter()
        step_fn(flat, grad, layout, optimizer, shard, group=None, counter=counter)
        sent.append(counter.bytes_sent)
        ref_opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        ref_opt.step()
        ours = {n: v.detach().clone() for n, v in zip(names, layout.views(flat), strict=True)}
        history.append((ours, {n: p.detach().clone() for n, p in ref.named_parameters()}))
    dist.barrier()
    return {"history": history, "sent": sent, "padded_bytes": layout.padded * 4}


def _check(results: list[dict], world_size: int, optim: str) -> None:
    """AssertionError naming the first (step, rank, parameter) that differs."""
    for step in range(len(results[0]["history"])):
        for rank, res in enumerate(results):
            ours, ref = res["history"][step]
            for name, expected in ref.items():
                got = ours[name]
                if not torch.allclose(got, expected, rtol=RTOL, atol=ATOL):
                    diff = (got - expected).abs().flatten()
                    i = int(diff.argmax())
                    g, e = got.flatten()[i].item(), expected.flatten()[i].item()
                    raise AssertionError(
                        f"{optim}, N={world_size}: after step {step + 1}, rank {rank}'s "
                        f"parameter {name!r} differs from the single-device model by up to "
                        f"{diff[i].item():.3g} (flat element {i}: got "
                        f"{g:.6g}, expected {e:.6g})"
                    )
            first = results[0]["history"][step][0]
            for name, value in ours.items():
                if not torch.equal(value, first[name]):
                    raise AssertionError(
                        f"{optim}, N={world_size}: after step {step + 1}, rank {rank}'s "
                        f"{name!r} is not bitwise equal to rank 0's: did every rank all-gather?"
                    )


def _check_bytes(results: list[dict], world_size: int) -> None:
    """Each rank must send 2(N-1)/N of the buffer: one reduce-scatter plus one all-gather."""
    expected = 2 * (world_size - 1) * results[0]["padded_bytes"] // world_size
    for rank, res in enumerate(results):
        got = res["sent"][-1]
        if got != expected:
            raise AssertionError(
                f"N={world_size}: rank {rank} sent {got} bytes in a step, expected "
                f"2(N-1)/N x {results[0]['padded_bytes']} = {expected}. Use "
                "C.ring_reduce_scatter and C.ring_all_gather with counter=counter (an "
                "all-reduce in place of the reduce-scatter sends 3(N-1)/N)"
            )


def grade_zero1_step(
    module_name: str, fn_name: str = "zero1_step", world_size: int = 2, optim: str = "sgd",
    steps: int = 3,
) -> None:  # fmt: skip
    """Chapter 3's graded exercise: check the learner's ZeRO-1 step on ``world_size`` ranks.

    ``optim`` is "sgd" (momentum 0.9, weight decay) or "adamw". Prints OK, or raises
    AssertionError naming the step, the rank and the parameter that differ.
    """
    try:
        results = run_distributed(
            _zero1_worker, world_size, os.getcwd(), module_name, fn_name, optim, steps,
            timeout_s=90,
        )  # fmt: skip
    except RankError as err:
        stub = stub_error(err, fn_name, module_name)
        if stub is not None:
            raise stub from None
        raise
    _check(results, world_size, optim)
    _check_bytes(results, world_size)
    sent = results[0]["sent"][-1]
    print(
        f"OK: {fn_name} matches single-device {optim} on {world_size} ranks for {steps} steps, "
        f"every parameter on every rank; each rank sent {sent} bytes per step = 2(N-1)/N of "
        f"the {results[0]['padded_bytes']}-byte buffer"
    )
