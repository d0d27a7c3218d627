"""Chapter 6: tensor parallelism as a training-loop strategy (``--strategy tp``).

:class:`TensorParallelSync` gives :class:`~course_lib.parallel.tensor_gpt.TensorParallelGPT`
the course's gradient-sync interface (``course_lib.train.GradientSync``): the gradients of
sequence-parallel parameters summed, clipping by the global norm (each slice once, each
replicated parameter once), the full state dict gathered, and checkpoint pieces named as
in the plain GPT, so a tp checkpoint resumes on one device, with data parallelism or with
another tp size. :class:`TensorParallelStrategy` plugs them into ``course_lib.train.train``:
every rank of the group draws the whole batch and computes its slice of every layer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from course_lib.checkpoint import Piece, Pieces, Shapes, whole_piece
from course_lib.launch import DistContext
from course_lib.memory import replicated_memory
from course_lib.model import GPT
from course_lib.parallel.tensor_gpt import (
    TensorParallelGPT,
    check_tensor_parallel,
    gather_full_state_dict,
    load_full_state_dict,
    squared_grad_norms,
    sync_sequence_parallel_grads,
    tensor_parallelize,
)
from course_lib.parallel.tensor_parallel import TPShard, all_reduce
from course_lib.topology import Topology
from course_lib.train import Strategy, TrainConfig, adamw_settings, optimizer_groups
from course_lib.train import train_step as shared_train_step


def shard_pieces(shard: TPShard, data: torch.Tensor) -> list[Piece]:
    """Chapter 6: a slice as checkpoint pieces: runs of consecutive elements of the whole tensor.

    A checkpoint piece is a range of the whole tensor's row-major flattening (chapter 3). A
    slice of rows is a few long runs; a slice of columns one run per row.
    """
    positions = torch.arange(math.prod(shard.full_shape))
    where = shard.take(positions.view(shard.full_shape)).flatten()  # flat position of each
    keep = (shard.index >= 0).view([-1 if d == shard.dim else 1 for d in range(data.dim())])
    keep = keep.expand(data.shape).flatten()
    where, values = where[keep], data.detach().flatten()[keep]
    breaks = ((where[1:] - where[:-1]) != 1).nonzero().flatten() + 1
    pieces, start = [], 0
    for stop in [*breaks.tolist(), where.numel()]:
        first = int(where[start])
        pieces.append(Piece(first, first + stop - start, values[start:stop].clone()))
        start = stop
    return pieces


class TensorParallelSync:
    """Chapter 6: the GradientSync of a tensor-parallel GPT: sliced and replicated parameters."""

    def __init__(self, model: TensorParallelGPT) -> None:
        self.module, self.comm = model, model.comm
        self.named = list(model.named_parameters())  # each Parameter once (tied: wte.weight)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        yield  # gradients accumulate locally; the sums happen in finish_...()

    def finish_gradient_synchronization(self) -> None:
        if self.module.sequence_parallel:
            sync_sequence_parallel_grads(self.module, self.comm)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.module.parameters()

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The global norm: the slices' squares summed over the group, replicated ones once."""
        sliced, replicated = squared_grad_norms([p for _, p in self.named])
        total = (all_reduce(sliced, self.comm) + replicated).sqrt().item()
        scale = min(1.0, max_norm / (total + 1e-6))
        for _, p in self.named:
            if p.grad is not None:
                p.grad.mul_(scale)
        return total

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return gather_full_state_dict(self.module)

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_full_state_dict(self.module, state)

    def memory_bytes(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        return replicated_memory(self.module, optimizer)

    def state_pieces(self, optimizer: torch.optim.Optimizer) -> tuple[Pieces, Shapes]:
        """Slices as runs of the whole tensors; replicated tensors written by group rank 0 only."""
        pieces: Pieces = {}
        shapes: Shapes = {}
        for name, p in self.named:
            state = {k: v for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
            shard = getattr(p, "tp_shard", None)
            full = shard.full_shape if shard is not None else tuple(p.shape)
            shapes[f"model/{name}"] = full
            for key, value in state.items():
                shapes[f"optimizer/{name}/{key}"] = full if value.dim() else ()
            tensors = {
                f"model/{name}": p.detach(),
                **{f"optimizer/{name}/{k}": v for k, v in state.items()},
            }
            for key, value in tensors.items():
                if shard is not None and value.dim():
                    pieces[key] = shard_pieces(shard, value)
                elif self.comm.rank == 0:
                    pieces[key] = [whole_piece(value)]
        return pieces, shapes

    @torch.no_grad()
    def load_state_pieces(
        self, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
    ) -> None:
        for name, p in self.named:
            shard = getattr(p, "tp_shard", None)

            def mine(whole: torch.Tensor, shard: TPShard | None = shard, p=p) -> torch.Tensor:
                whole = whole.to(p.device)
                return shard.take(whole) if shard is not None and whole.dim() else whole.clone()

            p.copy_(mine(tensors[f"model/{name}"]))
            prefix = f"optimizer/{name}/"
            state = {k[len(prefix) :]: mine(v) for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                optimizer.state[p] = state


class TensorParallelStrategy(Strategy):
    """Chapter 6: ``--strategy tp``: every layer split over ``world_size`` ranks."""

    name = "tp"

    def __init__(
        self,
        ctx: DistContext | None = None,
        sequence_parallel: bool = False,
        collectives: str = "ours",
    ) -> None:
        super().__init__(ctx)
        self.sequence_parallel, self.collectives = sequence_parallel, collectives

    def make_topology(self) -> Topology:
        return Topology(tp=self.ctx.world_size if self.ctx is not None else 1)

    def wrap(self, module: GPT, cfg: TrainConfig):
        check_tensor_parallel(module.config, self.topology.tp, cfg.seq_len, self.sequence_parallel)
        model = tensor_parallelize(
            module,
            self.topology,
            self.sequence_parallel,
            collectives=self.collectives,
            seed=cfg.seed,
        )
        optimizer = torch.optim.AdamW(
            optimizer_groups(list(model.parameters()), cfg), **adamw_settings(cfg)
        )
        return model, optimizer, TensorParallelSync(model)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        cfg = self.train_config
        loss = shared_train_step(
            self.model,
            self.optimizer,
            self.sync,
            x,
            y,
            lr,
            cfg.grad_clip,
            criterion=self.model.loss,
        )
        return loss.item()  # the same on every rank of the group

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        return self.model.loss(self.model(x), y).item()


def tensor_strategy(ctx: DistContext | None = None, **options: Any) -> TensorParallelStrategy:
    """``make_strategy("tp", ctx, sequence_parallel=..., collectives=...)``."""
    return TensorParallelStrategy(ctx, **options)
