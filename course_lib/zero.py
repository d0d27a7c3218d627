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
exact. Stages 1 and 2 are :class:`ZeroRedundancyOptimizer`; stage 3 is
:class:`FullyShardedDataParallel`. The optimizer must be elementwise (SGD, Adam, AdamW,
...): it steps a flat piece, not the original tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from course_lib import collectives as C
from course_lib.data_parallel import (
    DataParallelStrategy,
    broadcast_module,
    check_same_model,
    global_mean,
)
from course_lib.model import GPT, GPTConfig
from course_lib.train import TrainConfig, build_model, optimizer_groups, set_lr

if TYPE_CHECKING:
    from course_lib.launch import DistContext


class FlatLayout:
    """Chapter 3: tensors of one dtype end to end in a flat (padded,) buffer, cut N ways.

    ``padded`` is the total rounded up to a multiple of N, so every shard has
    ``shard_numel`` elements; the zeros of the padding never change (their gradient is 0).
    """

    def __init__(self, shapes: list[torch.Size], rank: int, world_size: int) -> None:
        self.shapes = shapes
        self.numels = [math.prod(s) for s in shapes]
        self.offsets = [sum(self.numels[:i]) for i in range(len(shapes))]
        self.numel = sum(self.numels)
        self.padded = -(-self.numel // world_size) * world_size  # ceil to a multiple of N
        self.shard_numel = self.padded // world_size
        self.start = rank * self.shard_numel  # this rank's piece: [start, start + shard_numel)

    def flatten(self, tensors: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
        """(padded,) buffer of ``tensors`` end to end; None and the padding become zeros."""
        flat = torch.zeros(self.padded, dtype=like.dtype, device=like.device)
        for t, start, n in zip(tensors, self.offsets, self.numels, strict=True):
            if t is not None:
                flat[start : start + n].copy_(t.reshape(-1))
        return flat

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each tensor's piece of ``flat``, shaped as the original (views, no copies)."""
        spans = zip(self.offsets, self.numels, self.shapes, strict=True)
        return [flat[start : start + n].view(shape) for start, n, shape in spans]

    def shard(self, flat: torch.Tensor) -> torch.Tensor:
        """This rank's (shard_numel,) piece of a (padded,) buffer, as a view."""
        return flat[self.start : self.start + self.shard_numel]


def check_optimizer_class(optimizer_class: Any) -> None:
    """Chapter 3: refuse anything that is not a ``torch.optim.Optimizer`` subclass."""
    if not (
        isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)
    ):
        raise ValueError(
            f"optimizer_class must be a torch.optim.Optimizer subclass such as torch.optim.AdamW, "
            f"got {optimizer_class!r}; pass the class itself, not an instance"
        )


def clip_grad_norm_(shards: list[nn.Parameter], max_norm: float, group=None) -> float:
    """Chapter 3: clip gradients held as shards by their GLOBAL norm; return the norm.

    The squared norm is the sum of every rank's squared shard norms (one all-reduce);
    then each shard is scaled like ``torch.nn.utils.clip_grad_norm_`` would scale it.
    """
    grads = [p.grad for p in shards if p.grad is not None]
    squares = torch.zeros(1, dtype=torch.float64)
    for g in grads:
        squares += g.detach().double().pow(2).sum().cpu()
    dist.all_reduce(squares, group=group)
    total = squares.sqrt().item()
    scale = min(1.0, max_norm / (total + 1e-6))
    for g in grads:
        g.mul_(scale)
    return total


def gather_object(obj: Any, group=None) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimizer keeps per parameter (m, v, momentum, ...)."""
    tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return sum(t.numel() * t.element_size() for t in tensors if t.dim() > 0)


def held_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Chapter 3: bytes of the distinct storages behind ``tensors`` (views counted once)."""
    storages = {}
    for t in tensors:
        if t is not None:
            s = t.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def zero_memory_formula(psi: int, world_size: int, stage: int, k: int = 8) -> dict[str, float]:
    """Chapter 3: bytes per rank for params, grads and optimizer state (fp32, K bytes/param)."""
    n = world_size
    return {
        "params": 4 * psi / (n if stage >= 3 else 1),
        "grads": 4 * psi / (n if stage >= 2 else 1),
        "optimizer": k * psi / (n if stage >= 1 else 1),
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
        """Reduce-scatter; afterwards ``shard.grad`` is the mean gradient of our piece.

        Stage 1 reduces its flat gradient in place (the other pieces then hold partial
        sums: scratch); stage 2 flattens the gradients, keeps the piece, frees the rest.
        """
        if self.grad_flat is not None:
            piece = C.ring_reduce_scatter(self.grad_flat, group, counter)  # (shard_numel,)
            self.shard.grad = piece.div_(world_size)  # a view of grad_flat
            return
        flat = self.layout.flatten([p.grad for p in self.params], self.flat)  # (padded,)
        piece = C.ring_reduce_scatter(flat, group, counter)  # (shard_numel,)
        self.shard.grad = piece.div_(world_size).clone()
        for p in self.params:
            p.grad = None


class ZeroRedundancyOptimizer:
    """Chapter 3: ZeRO stage 1 (or 2): each rank keeps optimizer state for 1/N of the parameters.

    ``ZeroRedundancyOptimizer(params, optimizer_class, **defaults)`` as in
    ``torch.distributed.optim``. Use it on a plain (unwrapped) replicated model: after
    ``backward`` each rank holds its local gradients; :meth:`reduce_gradients`
    reduce-scatters them so each rank gets the average of its piece only (stage 2 then
    frees the full gradients); :meth:`step` updates the piece and all-gathers the
    parameters, so every rank leaves with the same updated model. Bytes per rank and step:
    2 (N - 1)/N Psi elements, the same as the all-reduce of plain data parallelism.
    """

    def __init__(
        self,
        params: Iterable[Any],
        optimizer_class: type[torch.optim.Optimizer],
        group=None,
        stage: int = 1,
        counter: C.CommCounter | None = None,
        **defaults: Any,
    ) -> None:
        check_optimizer_class(optimizer_class)
        if stage not in (1, 2):
            raise ValueError(
                f"stage={stage}: ZeroRedundancyOptimizer is stage 1 or 2; "
                "stage 3 is FullyShardedDataParallel"
            )
        params = list(params)
        groups = params if params and isinstance(params[0], dict) else [{"params": params}]
        self.group, self.stage, self.counter = group, stage, counter
        self.world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.flat_groups, inner_groups = [], []
        for g in groups:
            trainable = [p for p in g["params"] if p.requires_grad]
            if trainable:
                fg = _FlatGroup(trainable, rank, self.world_size, stage)
                self.flat_groups.append(fg)
                inner_groups.append({**g, "params": [fg.shard]})
        self.optimizer = optimizer_class(inner_groups, **defaults)  # sees only our pieces
        self._reduced = False

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
        self.optimizer.step()
        for fg in self.flat_groups:
            C.ring_all_gather(fg.flat, self.group, self.counter)  # params are views of flat
        self._reduced = False

    def memory_bytes(self) -> dict[str, int]:
        """Chapter 3: bytes this rank holds for parameters, gradients and optimizer state."""
        params = [p for fg in self.flat_groups for p in fg.params]
        grads = [p.grad for p in params] + [fg.shard.grad for fg in self.flat_groups]
        return {
            "params": held_bytes(params),
            "grads": held_bytes(grads),
            "optimizer": state_bytes(self.optimizer),
        }

    def state_dict(self) -> dict[str, Any]:
        """Every rank's piece of the state (a collective: call it on every rank)."""
        return {"world_size": self.world_size, "shards": gather_object(self.optimizer.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"optimizer state saved at world size {state['world_size']}, "
                f"loading at {self.world_size}; resume with the same world size"
            )
        self.optimizer.load_state_dict(state["shards"][dist.get_rank(self.group)])


# ---------------------------------------------------------------------------------------
# ZeRO-3: fully sharded data parallel
# ---------------------------------------------------------------------------------------


class _ShardedTensors:
    """Chapter 3: some parameters of one unit, kept as 1/N flat piece, gathered on demand.

    ``shard`` is the fp32 master piece the optimizer steps. ``buffer`` holds the gathered
    (padded,) parameters in the compute dtype while the unit runs, and no bytes otherwise;
    ``full`` is a leaf aliasing ``buffer``'s memory (with its own version counter, so
    refilling ``buffer`` before backward does not trip autograd), whose ``.grad`` collects
    the unit's gradients.
    """

    def __init__(
        self, params: list[nn.Parameter], rank: int, world_size: int, compute_dtype: torch.dtype
    ) -> None:
        self.layout = FlatLayout([p.shape for p in params], rank, world_size)
        flat = self.layout.flatten(list(params), params[0].detach())  # (padded,) fp32
        self.shard = nn.Parameter(self.layout.shard(flat).clone())  # (shard_numel,)
        self.buffer = torch.zeros(self.layout.padded, dtype=compute_dtype, device=flat.device)
        storage = self.buffer.untyped_storage()
        self.full = torch.empty(0, dtype=compute_dtype, device=flat.device)
        self.full.set_(storage, 0, (self.layout.padded,)).requires_grad_()
        self.nbytes = storage.nbytes()
        self.gathered = True
        self.free()

    def gather(self, group, counter) -> None:
        if not self.gathered:
            self.buffer.untyped_storage().resize_(self.nbytes)
            with torch.no_grad():
                self.layout.shard(self.buffer).copy_(self.shard)  # fp32 -> compute dtype
                C.ring_all_gather(self.buffer, group, counter)
            self.gathered = True

    def free(self) -> None:
        if self.gathered:
            self.buffer.untyped_storage().resize_(0)
            self.gathered = False


class _Unit:
    """Chapter 3: a submodule whose parameters are gathered just before it runs, freed after."""

    def __init__(
        self,
        module: nn.Module,
        slots: list[tuple[nn.Module, str, nn.Parameter]],
        group_of: Callable[[nn.Parameter], int],
        rank: int,
        world_size: int,
        compute_dtype: torch.dtype,
    ) -> None:
        self.module, self.slots = module, slots  # slots: (owner module, attribute, parameter)
        unique = list({id(p): p for _, _, p in slots}.values())
        keys = sorted({group_of(p) for p in unique})
        self.groups = {k: [p for p in unique if group_of(p) == k] for k in keys}
        self.sharded = {
            k: _ShardedTensors(ps, rank, world_size, compute_dtype) for k, ps in self.groups.items()
        }
        for owner, attr, _ in slots:
            del owner._parameters[attr]  # from now on a plain attribute, set by gather()
        self.reduced = True

    def gather(self, group, counter) -> None:
        """All-gather the parameters and point every owner's attribute at its view."""
        views = {}
        for k, st in self.sharded.items():
            st.gather(group, counter)
            for p, v in zip(self.groups[k], st.layout.views(st.full), strict=True):
                views[id(p)] = v
        for owner, attr, p in self.slots:
            setattr(owner, attr, views[id(p)])
        self.reduced = False

    def free(self) -> None:
        for st in self.sharded.values():
            st.free()

    @torch.no_grad()
    def reduce(self, group, counter, world_size: int) -> None:
        """Reduce-scatter the unit's gradients into the fp32 shards' ``.grad``; free the rest."""
        for st in self.sharded.values():
            grad = st.full.grad if st.full.grad is not None else torch.zeros_like(st.buffer)
            piece = C.ring_reduce_scatter(grad, group, counter)  # (shard_numel,) compute dtype
            piece = piece.to(torch.float32, copy=True).div_(world_size)  # own memory
            st.shard.grad = piece if st.shard.grad is None else st.shard.grad.add_(piece)
            st.full.grad = None
        self.free()
        self.reduced = True


def _default_units(module: nn.Module) -> list[nn.Module]:
    """The GPT's transformer blocks (one unit each); any other module: root unit only."""
    blocks = getattr(module, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def _owning_unit(module: nn.Module, units: list[nn.Module]) -> dict[int, int]:
    """Parameter id -> index of the unit that owns it (-1: the root, also for shared ones)."""
    owner: dict[int, int] = {}
    for i, unit in enumerate(units):
        for p in unit.parameters():
            owner[id(p)] = i if owner.get(id(p), i) == i else -1
    return owner


def _slots(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    """Every (module, attribute, parameter) that holds a trainable parameter (tied: twice)."""
    return [
        (m, name, p)
        for m in module.modules()
        for name, p in m._parameters.items()
        if p is not None and p.requires_grad
    ]


class FullyShardedDataParallel(nn.Module):
    """Chapter 3: ZeRO-3 / FSDP: parameters, gradients and optimizer state all sharded N ways.

    Each unit (default: every transformer block, plus the root for everything else)
    keeps only its 1/N fp32 piece. Just before a unit's forward its parameters are
    all-gathered (cast to ``compute_dtype`` first, so communication is in that dtype
    too) and freed after it; a hook on the unit's output gathers them again before its
    backward; when its gradients are complete they are reduce-scattered into the pieces
    and freed. The root stays gathered from forward to the end of backward. Build the
    optimizer on :meth:`shard_parameters`; call :meth:`finish_gradient_synchronization`
    after backward. ``group_of(p)`` puts parameters in separate flat groups (the course:
    decayed 2-D weights apart from the rest); frozen parameters stay replicated.
    """

    def __init__(
        self,
        module: nn.Module,
        group=None,
        compute_dtype: torch.dtype | None = None,
        unit_modules: list[nn.Module] | None = None,
        group_of: Callable[[nn.Parameter], int] = lambda p: 0,
        counter: C.CommCounter | None = None,
    ) -> None:
        super().__init__()
        check_same_model(module, group)
        broadcast_module(module, 0, group)
        self.module, self.group, self.counter = module, group, counter
        self.world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.names: dict[int, list[str]] = {}  # parameter id -> every name it has (tied: 2)
        for name, p in module.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), []).append(name)
        dtype = compute_dtype or torch.float32
        units = unit_modules if unit_modules is not None else _default_units(module)
        owner = _owning_unit(module, units)
        slots = _slots(module)
        args = (group_of, rank, self.world_size, dtype)
        by_unit = [[s for s in slots if owner.get(id(s[2]), -1) == i] for i in range(len(units))]
        self.units = [_Unit(u, s, *args) for u, s in zip(units, by_unit, strict=True) if s]
        root_slots = [s for s in slots if owner.get(id(s[2]), -1) == -1]
        self.root = _Unit(module, root_slots, *args) if root_slots else None
        for unit in self.units:
            unit.module.register_forward_pre_hook(lambda m, a, u=unit: self._pre_forward(u))
            unit.module.register_forward_hook(lambda m, a, out, u=unit: self._post_forward(u, out))
        for unit in self.all_units():
            for st in unit.sharded.values():
                st.full.register_post_accumulate_grad_hook(lambda t, u=unit: self._post_backward(u))

    def all_units(self) -> list[_Unit]:
        return self.units + ([self.root] if self.root is not None else [])

    def shard_parameters(self) -> list[tuple[int, nn.Parameter]]:
        """Chapter 3: (group key, fp32 piece) for the optimizer; each rank's own pieces."""
        return [(k, st.shard) for u in self.all_units() for k, st in u.sharded.items()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.root is not None:
            self.root.gather(self.group, self.counter)
        out = self.module(*args, **kwargs)
        if self.root is not None and not torch.is_grad_enabled():
            self.root.free()  # no backward will come to free it
        return out

    def _pre_forward(self, unit: _Unit) -> None:
        unit.gather(self.group, self.counter)

    def _post_forward(self, unit: _Unit, out: Any) -> None:
        unit.free()
        if torch.is_tensor(out) and out.requires_grad:
            out.register_hook(lambda grad: self._pre_backward(unit, grad))

    def _pre_backward(self, unit: _Unit, grad: torch.Tensor) -> torch.Tensor:
        unit.gather(self.group, self.counter)
        return grad

    def _post_backward(self, unit: _Unit) -> None:
        if all(st.full.grad is not None for st in unit.sharded.values()):
            unit.reduce(self.group, self.counter, self.world_size)

    def finish_gradient_synchronization(self) -> None:
        """Chapter 3: after backward, check every unit that ran has reduced its gradients.

        A unit that ran in forward but got no gradient (unused output) is freed and its
        pieces keep ``grad=None``, as on one device. No communication here, so a unit
        must be used by every rank or by none in a step.
        """
        for unit in self.all_units():
            if unit.reduced:
                continue
            if any(st.full.grad is not None for st in unit.sharded.values()):
                unit.reduce(self.group, self.counter, self.world_size)  # some pieces unused
            else:
                unit.free()
                unit.reduced = True

    def zero_grad(self) -> None:
        for _, shard in self.shard_parameters():
            shard.grad = None

    @torch.no_grad()
    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Chapter 3: every parameter, whole and fp32, by its original name (a collective)."""
        out = {}
        for unit in self.all_units():
            for k, st in unit.sharded.items():
                flat = torch.zeros(st.layout.padded, device=st.shard.device)  # (padded,) fp32
                st.layout.shard(flat).copy_(st.shard)
                C.ring_all_gather(flat, self.group)
                for p, v in zip(unit.groups[k], st.layout.views(flat), strict=True):
                    whole = v.clone()
                    out.update({name: whole for name in self.names[id(p)]})
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Chapter 3: the state dict of the unwrapped module (a collective)."""
        state = self.full_parameters()
        for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
            state.setdefault(name, t.detach().clone())
        return state

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Chapter 3: each rank copies its piece out of a full state dict (no communication)."""
        for unit in self.all_units():
            for k, st in unit.sharded.items():
                tensors = [state[self.names[id(p)][0]] for p in unit.groups[k]]
                flat = st.layout.flatten(tensors, st.shard)
                st.shard.copy_(st.layout.shard(flat))
        for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
            t.copy_(state[name])

    def memory_bytes(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Chapter 3: bytes this rank holds for parameters, gradients and optimizer state."""
        shards = [s for _, s in self.shard_parameters()]
        gathered = [st.buffer for u in self.all_units() for st in u.sharded.values()]
        return {
            "params": held_bytes(shards) + sum(b.untyped_storage().nbytes() for b in gathered),
            "grads": held_bytes(s.grad for s in shards),
            "optimizer": state_bytes(optimizer),
        }


# ---------------------------------------------------------------------------------------
# The training loop's strategies: `python -m course_lib train --strategy zero1|zero2|zero3`
# ---------------------------------------------------------------------------------------


class Zero12Strategy(DataParallelStrategy):
    """Chapter 3: the data-parallel step with :class:`ZeroRedundancyOptimizer` (stage 1 or 2)."""

    stage = 1

    def setup(self, model_config: GPTConfig, train_config: TrainConfig, device: Any) -> None:
        self.device, self.train_config = torch.device(device), train_config
        self.model = build_model(model_config, train_config.seed, self.device)
        check_same_model(self.model)
        broadcast_module(self.model)
        groups = optimizer_groups(list(self.model.parameters()), train_config)
        betas = (train_config.beta1, train_config.beta2)
        self.optimizer = ZeroRedundancyOptimizer(
            groups, torch.optim.AdamW, stage=self.stage, lr=train_config.lr, betas=betas
        )

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        set_lr(self.optimizer, lr)
        self.model.train()
        _, loss = self.model(x, y)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.reduce_gradients()
        if self.train_config.grad_clip > 0:
            self.optimizer.clip_grad_norm_(self.train_config.grad_clip)
        self.optimizer.step()
        return global_mean(loss)

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():  # copy in place: the parameters are views of flat buffers
            for name, t in self.model.state_dict(keep_vars=True).items():
                t.copy_(state["model"][name])
        self.optimizer.load_state_dict(state["optimizer"])

    def full_model(self) -> GPT:
        return self.model


class Zero1Strategy(Zero12Strategy):
    name, stage = "zero1", 1


class Zero2Strategy(Zero12Strategy):
    name, stage = "zero2", 2


class Zero3Strategy(DataParallelStrategy):
    """Chapter 3: the data-parallel step on :class:`FullyShardedDataParallel` (ZeRO-3)."""

    name = "zero3"

    def __init__(
        self, ctx: DistContext | None = None, compute_dtype: torch.dtype | None = None
    ) -> None:
        super().__init__(ctx)
        self.compute_dtype = compute_dtype
        self.model_config: GPTConfig | None = None

    def setup(self, model_config: GPTConfig, train_config: TrainConfig, device: Any) -> None:
        self.device, self.train_config = torch.device(device), train_config
        self.model_config = model_config
        module = build_model(model_config, train_config.seed, self.device)
        self.model = FullyShardedDataParallel(
            module, compute_dtype=self.compute_dtype, group_of=lambda p: int(p.dim() >= 2)
        )
        shards = self.model.shard_parameters()
        decay = train_config.weight_decay
        groups = [
            {"params": [s for k, s in shards if k == 1], "weight_decay": decay},
            {"params": [s for k, s in shards if k == 0], "weight_decay": 0.0},
        ]
        betas = (train_config.beta1, train_config.beta2)
        self.optimizer = torch.optim.AdamW(groups, lr=train_config.lr, betas=betas)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        set_lr(self.optimizer, lr)
        self.model.train()
        _, loss = self.model(x, y)
        self.model.zero_grad()
        loss.backward()
        self.model.finish_gradient_synchronization()
        if self.train_config.grad_clip > 0:
            shards = [s for _, s in self.model.shard_parameters()]
            clip_grad_norm_(shards, self.train_config.grad_clip)
        self.optimizer.step()
        return global_mean(loss)

    def state_dict(self) -> dict[str, Any]:
        optimizer = {
            "world_size": self.model.world_size,
            "shards": gather_object(self.optimizer.state_dict()),
        }
        return {"model": self.model.full_state_dict(), "optimizer": optimizer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_full_state_dict(state["model"])
        saved = state["optimizer"]
        if saved["world_size"] != self.model.world_size:
            raise ValueError(
                f"optimizer state saved at world size {saved['world_size']}, "
                f"loading at {self.model.world_size}; resume with the same one"
            )
        self.optimizer.load_state_dict(saved["shards"][dist.get_rank()])

    def full_model(self) -> GPT:
        model = GPT(self.model_config)
        model.load_state_dict(self.model.full_state_dict())
        return model.to(self.device)
