"""ZeRO from scratch: sharded optimizer state (1), gradients (2) and parameters (3) (chapter 3).

Plain data parallelism keeps N copies of everything: with Psi parameters and Adam, each
rank holds 4 Psi bytes of fp32 parameters, 4 Psi of gradients and 8 Psi of optimizer
state (m and v). ZeRO (Rajbhandari et al., 2020) cuts the redundant copies N ways:

- stage 1 shards the optimizer state:                 4 Psi + 4 Psi + 8 Psi / N
- stage 2 also shards the gradients:                  4 Psi + (4 Psi + 8 Psi) / N
- stage 3 (FSDP) also shards the parameters:          (4 Psi + 4 Psi + 8 Psi) / N

Every stage lays a group of parameters end to end in one flat buffer, padded to a
multiple of N, and gives rank r the r-th of N equal pieces (:class:`FlatLayout`).
Gradients are reduce-scattered (each rank receives only the sum of its piece) and
updated parameters all-gathered, both with chapter 1's ring, whose byte counter is
exact. Stages 1 and 2 are :class:`ZeroRedundancyOptimizer` (this file); stage 3 is
``FullyShardedDataParallel`` (``course_lib/parallel/fsdp.py``). The optimizer must be
elementwise (SGD, Adam, AdamW, ...): it steps a flat piece, not the original tensors.
Stage 1's step, :func:`reduce_scatter_gradients` then :func:`step_and_all_gather`, is
chapter 3's graded exercise: the grader passes the learner's two functions in their place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from course_lib import collectives as C
from course_lib.checkpoint import (
    Pieces,
    Shapes,
    flat_state_pieces,
    load_flat_optimizer_state,
    replicated_pieces,
)
from course_lib.flat import FlatLayout
from course_lib.memory import held_bytes, state_bytes
from course_lib.model import GPT
from course_lib.parallel.common import (
    SyncSwitch,
    broadcast_module,
    check_optimizer_class,
    check_same_model,
    clip_grad_norm_,
    require_member,
)
from course_lib.train import (
    Strategy,
    TrainConfig,
    adamw_settings,
    optimizer_groups,
)


def zero_memory_formula(psi: int, world_size: int, stage: int, k: int = 8) -> dict[str, float]:
    """Chapter 3: bytes per rank for params, grads and optimizer state (fp32, K bytes/param)."""
    n = world_size
    return {
        "params": 4 * psi / (n if stage >= 3 else 1),
        "grads": 4 * psi / (n if stage >= 2 else 1),
        "optimizer": k * psi / (n if stage >= 1 else 1),
    }


def zero3_params_formula(
    unit_numels: Sequence[int],
    world_size: int,
    running: int | None,
    prefetch: bool,
    root_numel: int = 0,
    compute_bytes: int = 4,
) -> dict[str, float]:
    """Chapter 3: ZeRO-3's parameter bytes per rank while unit ``running``'s forward runs.

    ``unit_numels`` are the units' padded flat sizes in forward order (the blocks), and
    ``root_numel`` the root's (embeddings, final LayerNorm; 0 if none). Four named terms:

    - ``pieces``: this rank's fp32 1/N piece of every unit, 4 (sum + root) / N;
    - ``root``: the root, gathered from forward to the end of backward;
    - ``running``: the unit whose forward runs, gathered in the compute dtype;
    - ``prefetch``: the next unit, whose all-gather is already in flight with
      ``prefetch=True`` (0 without prefetch, or after the last unit).

    ``running=None``: between steps, the pieces only. The sum is what
    ``FullyShardedDataParallel.memory_bytes()["params"]`` measures; with
    ``running=None`` the pieces equal :func:`zero_memory_formula`'s stage-3 ``params``
    (up to the padding).
    """
    n = len(unit_numels)
    if running is not None and not 0 <= running < n:
        raise ValueError(f"running={running}: a unit index in 0..{n - 1}, or None between steps")
    gathered = running is not None
    nxt = running + 1 if gathered and prefetch and running + 1 < n else None
    return {
        "pieces": 4 * (sum(unit_numels) + root_numel) / world_size,
        "root": compute_bytes * root_numel if gathered else 0,
        "running": compute_bytes * unit_numels[running] if gathered else 0,
        "prefetch": compute_bytes * unit_numels[nxt] if nxt is not None else 0,
    }


# ---------------------------------------------------------------------------------------
# ZeRO-1 and ZeRO-2: the sharded optimizer
# ---------------------------------------------------------------------------------------


class _FlatGroup:
    """One parameter group of :class:`ZeroRedundancyOptimizer`, re-pointed into a flat buffer."""

    def __init__(self, params: list[nn.Parameter], rank: int, world_size: int, stage: int) -> None:
        if len({p.dtype for p in params}) > 1:
            raise ValueError("a parameter group mixes dtypes; give each dtype its own group")
        self.params, self.stage = params, stage
        self.layout = FlatLayout([p.shape for p in params], rank, world_size)
        with torch.no_grad():  # a plain buffer: no autograd graph back to the old tensors
            self.flat = self.layout.flatten(list(params), params[0])  # (padded,)
        for p, view in zip(params, self.layout.views(self.flat), strict=True):
            p.data = view  # the model's parameters now live in the flat buffer
        self.shard = nn.Parameter(self.layout.shard(self.flat))  # a view: no extra copy
        # Stage 1 keeps a whole gradient: autograd accumulates into views of one flat
        # buffer, reduce-scattered in place. Stage 2 keeps only its reduced piece.
        self.grad_flat = torch.zeros_like(self.flat) if stage == 1 else None  # (padded,)
        self.zero_grad()

    def zero_grad(self) -> None:
        self.shard.grad = None
        if self.grad_flat is None:
            for p in self.params:
                p.grad = None
            return
        self.grad_flat.zero_()
        for p, view in zip(self.params, self.layout.views(self.grad_flat), strict=True):
            p.grad = view

    def reduce(self, group, counter: C.CommCounter | None, world_size: int) -> None:
        """Stage 2's reduce-scatter; afterwards ``shard.grad`` is the mean gradient of our piece.

        Stage 2 flattens the gradients, keeps the piece, frees the rest (stage 1 reduces
        its flat gradient in place: :func:`reduce_scatter_gradients`).
        """
        flat = self.layout.flatten([p.grad for p in self.params], self.flat)  # (padded,)
        piece = C.ring_reduce_scatter(flat, group, counter)  # (shard_numel,)
        self.shard.grad = piece.div_(world_size).clone()
        for p in self.params:
            p.grad = None


def reduce_scatter_gradients(zero: ZeroRedundancyOptimizer) -> None:
    """Chapter 3 (the graded exercise), stage 1: ``shard.grad`` = the mean gradient of our piece.

    Each flat group's local gradient ``grad_flat`` is reduce-scattered in place: this rank
    receives the sum over ranks of its piece only (the other pieces then hold partial
    sums: scratch); divided by N it is what one device would see with the global batch.
    """
    for fg in zero.flat_groups:
        piece = C.ring_reduce_scatter(fg.grad_flat, zero.group, zero.counter)  # (shard_numel,)
        fg.shard.grad = piece.div_(zero.world_size)  # a view of grad_flat


def step_and_all_gather(zero: ZeroRedundancyOptimizer) -> None:
    """Chapter 3 (the graded exercise): update our pieces, then all-gather every flat buffer."""
    zero.optimizer.step()  # steps only our pieces: each shard is a view of its flat buffer
    for fg in zero.flat_groups:
        C.ring_all_gather(fg.flat, zero.group, zero.counter)  # params are views of flat


ZeroPhase = Callable[["ZeroRedundancyOptimizer"], None]  # the two functions' signature
_STAGE1_REDUCE = reduce_scatter_gradients  # the library's, told apart from a learner's


class ZeroRedundancyOptimizer(SyncSwitch):
    """Chapter 3: ZeRO stage 1 (or 2): each rank keeps optimizer state for 1/N of the parameters.

    ``ZeroRedundancyOptimizer(params, optimizer_class, **defaults)`` as in
    ``torch.distributed.optim``. Use it on a plain (unwrapped) replicated model: after
    ``backward`` each rank holds its local gradients; :meth:`reduce_gradients`
    reduce-scatters them so each rank gets the average of its piece only (stage 2 then
    frees the full gradients); :meth:`step` updates the piece and all-gathers the
    parameters, so every rank leaves with the same updated model. Bytes per rank and step:
    2 (N - 1)/N Psi elements, the same as the all-reduce of plain data parallelism.

    ``reduce_scatter_gradients`` (stage 1 only) and ``step_and_all_gather`` replace
    :func:`reduce_scatter_gradients` and :func:`step_and_all_gather` (the exercise's
    grader passes the learner's); both take this optimizer as their argument. They are
    two functions, not one step, because clipping by the global norm runs between them.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[torch.optim.Optimizer],
        group=None,
        stage: int = 1,
        counter: C.CommCounter | None = None,
        module: nn.Module | None = None,
        *,
        reduce_scatter_gradients: ZeroPhase = reduce_scatter_gradients,
        step_and_all_gather: ZeroPhase = step_and_all_gather,
        **defaults: Any,
    ) -> None:
        check_optimizer_class(optimizer_class)
        if stage not in (1, 2):
            raise ValueError(
                f"stage={stage}: ZeroRedundancyOptimizer is stage 1 or 2; "
                "stage 3 is FullyShardedDataParallel"
            )
        if stage == 2 and reduce_scatter_gradients is not _STAGE1_REDUCE:
            raise ValueError(
                "reduce_scatter_gradients= replaces stage 1's in-place reduce-scatter; "
                "stage 2 keeps its own (it frees the full gradients): use stage=1"
            )
        self.reduce_fn, self.step_fn = reduce_scatter_gradients, step_and_all_gather
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        # No group: the whole world, named explicitly (strategies pass their Topology's).
        self.group = group if group is not None else dist.group.WORLD
        require_member(self.group, "ZeroRedundancyOptimizer")
        self.stage, self.counter, self.module = stage, counter, module
        self.world_size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        if module is not None:  # the same model on every rank, rank 0's weights
            check_same_model(module, self.group)
            broadcast_module(module, self.group)
        self.flat_groups, inner_groups = [], []
        for g in groups:
            trainable = [p for p in g["params"] if p.requires_grad]
            if trainable:
                fg = _FlatGroup(trainable, rank, self.world_size, stage)
                self.flat_groups.append(fg)
                inner_groups.append({**g, "params": [fg.shard]})
        self.optimizer = optimizer_class(inner_groups, **defaults)  # sees only our pieces
        self._reduced = False
        self.require_sync = True  # False inside no_sync(): gradients only accumulate

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # the inner optimizer's: set lr here
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Stage 2: every gradient to None; stage 1: the flat gradient to zeros (kept)."""
        for fg in self.flat_groups:
            fg.zero_grad()
        self._reduced = False

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Chapter 3: reduce-scatter the local gradients; ``shard.grad`` = mean of our piece."""
        if not self.require_sync:
            raise RuntimeError(
                "reduce_gradients() inside no_sync(): call it after the backward that "
                "runs outside no_sync()"
            )
        if self.stage == 1:
            self.reduce_fn(self)
        else:
            for fg in self.flat_groups:
                fg.reduce(self.group, self.counter, self.world_size)
        self._reduced = True

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Chapter 3: clip by the global gradient norm (call after :meth:`reduce_gradients`)."""
        if not self._reduced:
            self.reduce_gradients()
        return clip_grad_norm_([fg.shard for fg in self.flat_groups], max_norm, self.group)

    @torch.no_grad()
    def step(self) -> None:
        """Chapter 3: update our piece, then all-gather every piece into every rank's model."""
        if not self._reduced:
            self.reduce_gradients()
        self.step_fn(self)  # step_and_all_gather: the optimizer, then the all-gathers
        self._reduced = False

    # -- the GradientSync interface (course_lib.train) -------------------------------------

    def finish_gradient_synchronization(self) -> None:
        """Chapter 3: the reduce-scatter of :meth:`reduce_gradients`."""
        self.reduce_gradients()

    def parameters(self) -> Iterator[nn.Parameter]:
        """The model's parameters this optimizer updates (every rank holds them whole)."""
        for fg in self.flat_groups:
            yield from fg.params

    def memory_bytes(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        """Chapter 3: bytes this rank holds for parameters, gradients and optimizer state."""
        params = list(self.parameters())
        grads = [p.grad for p in params] + [fg.shard.grad for fg in self.flat_groups]
        return {
            "params": held_bytes(params),
            "grads": held_bytes(grads),
            "optimizer": state_bytes(self.optimizer),
        }

    def _module(self) -> nn.Module:
        if self.module is None:
            raise ValueError(
                "this ZeroRedundancyOptimizer does not know its model: pass module=model "
                "to name the parameters in full_state_dict and checkpoints"
            )
        return self.module

    def _names(self, fg: _FlatGroup) -> list[str]:
        names = {id(p): n for n, p in self._module().named_parameters()}
        return [names[id(p)] for p in fg.params]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict: every rank holds the parameters whole (no communication)."""
        return {k: v.detach().clone() for k, v in self._module().state_dict().items()}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in self._module().state_dict(keep_vars=True).items():
            t.copy_(state[name])  # in place: the parameters are views of the flat buffers

    def state_pieces(self, optimizer: torch.optim.Optimizer | None = None) -> tuple[Pieces, Shapes]:
        """Chapter 3: each rank writes its piece of every flat group, model and optimizer."""
        first = dist.get_rank(self.group) == 0
        stepped = {id(p) for p in self.parameters()}
        rest = _Frozen(self._module(), stepped)  # frozen parameters and buffers: whole
        pieces, shapes = replicated_pieces(rest, self.optimizer, write=first)
        for fg in self.flat_groups:
            got, got_shapes = flat_state_pieces(
                fg.layout, self._names(fg), fg.shard, self.optimizer, first
            )
            pieces.update(got)
            shapes.update(got_shapes)
        return pieces, shapes

    @torch.no_grad()
    def load_state_pieces(
        self, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Chapter 3: copy the whole parameters in, re-cut the optimizer state for this rank."""
        module = self._module()
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            t.copy_(tensors[f"model/{name}"])
        for fg in self.flat_groups:
            names = self._names(fg)
            load_flat_optimizer_state(fg.layout, names, fg.shard, self.optimizer, tensors)


class _Frozen(nn.Module):
    """A view of a module's frozen parameters and buffers only, for checkpoint naming."""

    def __init__(self, module: nn.Module, skip: set[int]) -> None:
        super().__init__()
        self.items = [(n, p) for n, p in module.named_parameters() if id(p) not in skip]
        self.buffer_items = list(module.named_buffers())

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        return iter(self.items)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.buffer_items)


# ---------------------------------------------------------------------------------------
# The training loop's strategies: `python -m course_lib train --strategy zero1|zero2`
# ---------------------------------------------------------------------------------------


class Zero12Strategy(Strategy):
    """Chapter 3: the data-parallel step with :class:`ZeroRedundancyOptimizer` (stage 1 or 2)."""

    stage = 1

    def wrap(self, module: GPT, cfg: TrainConfig):
        groups = optimizer_groups(list(module.parameters()), cfg)
        zero = ZeroRedundancyOptimizer(
            groups,
            torch.optim.AdamW,
            group=self.topology.dp_group,
            stage=self.stage,
            module=module,
            **adamw_settings(cfg),
        )
        return module, zero, zero


class Zero1Strategy(Zero12Strategy):
    name, stage = "zero1", 1


class Zero2Strategy(Zero12Strategy):
    name, stage = "zero2", 2
