"""ZeRO stage 3 / FSDP from scratch: parameters, gradients and optimizer state sharded (chapter 3).

Stage 3 of ZeRO (Rajbhandari et al., 2020), which PyTorch calls fully sharded data
parallelism: each rank keeps only its 1/N flat piece of every parameter, in fp32, and
the optimizer steps those pieces. A unit's parameters (a transformer block, or the root
for everything else) are all-gathered just before the unit runs and freed right after;
its gradients are reduce-scattered into the pieces as soon as backward has produced them.
Per rank: (4 Psi + 4 Psi + 8 Psi) / N bytes with Adam, plus the gathered root and
one gathered block at a time.

With ``prefetch=True`` it hides its traffic as torch's FSDP does: the next unit's
all-gather is posted (``async_op=True``) while the current unit computes, in forward (the
previous step's order) and in backward (this step's forward order reversed), and a unit's
gradients are reduce-scattered asynchronously while backward continues; the optimizer
waits for all of them. Up to two units are then gathered at once (one more term in the
memory formula: :func:`course_lib.parallel.zero.zero3_params_formula`). A
:class:`Timeline` records what ran when, for the chapter's figure.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
    check_same_model,
    clip_grad_norm_,
    require_member,
)
from course_lib.train import (
    Strategy,
    TrainConfig,
    adamw_settings,
)


@dataclass(frozen=True)
class TimelineEvent:
    """Chapter 3: one thing a unit did, in seconds since its :class:`Timeline` started."""

    unit: str  # "block 0", "block 1", ..., "root"
    kind: str  # "all-gather", "forward", "backward" or "reduce-scatter"
    start: float  # when it was posted (communication) or began (compute)
    end: float  # when it completed


class Timeline:
    """Chapter 3: records every unit's all-gathers, forward, backward and reduce-scatters.

    Pass one to :class:`FullyShardedDataParallel` (``timeline=``); call :meth:`reset`
    before the step to draw. An asynchronous collective's end is stamped by gloo's
    thread when it completes, hence the lock. ``course_lib.viz.plots_zero`` draws it.
    """

    def __init__(self) -> None:
        self.events: list[TimelineEvent] = []
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, unit: str, kind: str, start: float, end: float | None = None) -> None:
        with self._lock:
            self.events.append(TimelineEvent(unit, kind, start, self.now() if end is None else end))

    def add_when_done(self, work: dist.Work, unit: str, kind: str, start: float) -> None:
        """Stamp the end of ``work`` (an ``async_op=True`` handle) when it completes."""
        work.get_future().add_done_callback(lambda _: self.add(unit, kind, start))

    def reset(self) -> None:
        with self._lock:
            self.events, self.t0 = [], time.perf_counter()


def _count(counter: C.CommCounter | None, op: str, messages: int, nbytes: int) -> None:
    """Count ``messages`` messages of ``nbytes`` sent and as many received (torch's collectives)."""
    if counter is not None:
        for _ in range(messages):
            counter.record_send(op, nbytes)
            counter.record_recv(nbytes)


class _Unflatten(torch.autograd.Function):
    """Chapter 3: a flat (padded,) leaf -> every parameter's view; backward: one concatenation.

    Plain slices of the flat leaf would each send back a zero-filled (padded,) gradient,
    summed into ``full.grad`` one by one (k parameters: k full-size buffers); this sends
    back one buffer, the parameters' gradients end to end, as torch's FSDP copies them.
    """

    @staticmethod
    def forward(ctx: Any, flat: torch.Tensor, layout: FlatLayout) -> tuple[torch.Tensor, ...]:
        ctx.layout = layout
        ctx.set_materialize_grads(False)  # an unused parameter's gradient: None, not zeros
        return tuple(layout.views(flat))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        return ctx.layout.flatten(list(grads), next(g for g in grads if g is not None)), None


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
        self.pending: dist.Work | None = None  # an asynchronous all-gather into buffer
        self.free()

    def gather(self, group, counter) -> None:
        if not self.gathered:
            self.buffer.untyped_storage().resize_(self.nbytes)
            with torch.no_grad():
                self.layout.shard(self.buffer).copy_(self.shard)  # fp32 -> compute dtype
                C.ring_all_gather(self.buffer, group, counter)
            self.gathered = True

    def start_gather(self, group, counter, world_size: int) -> dist.Work | None:
        """Post the all-gather into ``buffer`` (``async_op=True``); :meth:`wait` completes it.

        gloo's all-gather is a ring: each rank sends its piece and N - 2 others, (N-1)/N
        of the unit, as chapter 1's ring does; counted here since torch counts nothing.
        """
        if self.gathered or self.pending is not None:
            return None
        self.buffer.untyped_storage().resize_(self.nbytes)
        piece = self.shard.detach().to(self.buffer.dtype)  # fp32: the shard itself, no copy
        self.pending = dist.all_gather_into_tensor(self.buffer, piece, group, async_op=True)
        nbytes = piece.numel() * piece.element_size()
        _count(counter, "all_gather_into_tensor", world_size - 1, nbytes)
        return self.pending

    def wait(self) -> None:
        if self.pending is not None:
            self.pending.wait()
            self.pending, self.gathered = None, True

    def free(self) -> None:
        self.wait()
        if self.gathered:
            self.buffer.untyped_storage().resize_(0)
            self.gathered = False


class _PendingReduce:
    """Chapter 3: one flat group's reduce-scatter in flight, as an all-to-all.

    gloo's ``reduce_scatter_tensor`` is an all-reduce followed by a slice (twice the
    bytes of a reduce-scatter), so each rank sends chunk j of its gradient straight to
    rank j (``all_to_all_single``: (N-1)/N of the gradient, as the ring) and sums the N
    chunks it receives for its own piece, in rank order, when the optimizer needs them.
    """

    def __init__(self, st: _ShardedTensors, grad: torch.Tensor, group, counter, n: int) -> None:
        self.st, self.grad, self.n = st, grad, n  # grad: (padded,), kept alive until done
        self.received = torch.empty_like(grad)  # (N * shard_numel,): row r from rank r
        self.work = dist.all_to_all_single(self.received, grad, group=group, async_op=True)
        _count(counter, "all_to_all_single", n - 1, grad.numel() // n * grad.element_size())

    @torch.no_grad()
    def finish(self) -> None:
        self.work.wait()
        rows = self.received.view(self.n, -1)  # (N, shard_numel)
        piece = rows.to(torch.float32).sum(0).div_(self.n)  # (shard_numel,) fp32, own memory
        st = self.st
        st.shard.grad = piece if st.shard.grad is None else st.shard.grad.add_(piece)


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
        self.ready: set[int] = set()  # group keys whose gradient this backward produced
        self.name = "root"  # "block i" once FullyShardedDataParallel numbers its units

    def gather(self, group, counter, timeline: Timeline | None = None) -> None:
        """All-gather the parameters (chapter 1's ring) and point every owner at its view."""
        start = timeline.now() if timeline is not None else 0.0
        for st in self.sharded.values():
            st.gather(group, counter)
        if timeline is not None:
            timeline.add(self.name, "all-gather", start)
        self._point_at_views()

    def start_gather(self, group, counter, world_size: int, timeline: Timeline | None) -> None:
        """Post the all-gathers of every flat group (``async_op=True``); no waiting."""
        for st in self.sharded.values():
            start = timeline.now() if timeline is not None else 0.0
            work = st.start_gather(group, counter, world_size)
            if work is not None and timeline is not None:
                timeline.add_when_done(work, self.name, "all-gather", start)

    def wait_gather(self) -> None:
        """Wait for the posted all-gathers, then point every owner's attribute at its view."""
        for st in self.sharded.values():
            st.wait()
        self._point_at_views()

    def is_gathering(self) -> bool:
        return any(st.gathered or st.pending is not None for st in self.sharded.values())

    def _point_at_views(self) -> None:
        views = {}
        for k, st in self.sharded.items():
            for p, v in zip(self.groups[k], _Unflatten.apply(st.full, st.layout), strict=True):
                views[id(p)] = v
        for owner, attr, p in self.slots:
            setattr(owner, attr, views[id(p)])
        self.reduced = False

    def free(self) -> None:
        for st in self.sharded.values():
            st.free()

    @torch.no_grad()
    def reduce(self, group, counter, world_size: int, timeline: Timeline | None = None) -> None:
        """Reduce-scatter the unit's gradients into the fp32 shards' ``.grad``; free the rest."""
        start = timeline.now() if timeline is not None else 0.0
        for st in self.sharded.values():
            grad = st.full.grad if st.full.grad is not None else torch.zeros_like(st.buffer)
            piece = C.ring_reduce_scatter(grad, group, counter)  # (shard_numel,) compute dtype
            piece = piece.to(torch.float32, copy=True).div_(world_size)  # own memory
            st.shard.grad = piece if st.shard.grad is None else st.shard.grad.add_(piece)
            st.full.grad = None
        if timeline is not None:
            timeline.add(self.name, "reduce-scatter", start)
        self.free()
        self.reduced = True

    @torch.no_grad()
    def start_reduce(
        self, group, counter, world_size: int, timeline: Timeline | None
    ) -> list[_PendingReduce]:
        """Post the reduce-scatters (``async_op=True``), free the parameters; finish later."""
        pending = []
        for st in self.sharded.values():
            grad = st.full.grad if st.full.grad is not None else torch.zeros_like(st.buffer)
            st.full.grad = None
            start = timeline.now() if timeline is not None else 0.0
            pending.append(_PendingReduce(st, grad, group, counter, world_size))
            if timeline is not None:
                timeline.add_when_done(pending[-1].work, self.name, "reduce-scatter", start)
        self.free()
        self.reduced = True
        return pending


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


class FullyShardedDataParallel(SyncSwitch, nn.Module):
    """Chapter 3: ZeRO-3 / FSDP: parameters, gradients and optimizer state all sharded N ways.

    Each unit (default: every transformer block, plus the root for everything else)
    keeps only its 1/N fp32 piece. Just before a unit's forward its parameters are
    all-gathered (cast to ``compute_dtype`` first, so communication is in that dtype
    too) and freed after it; a hook on the unit's output gathers them again before its
    backward; when its gradients are complete they are reduce-scattered into the pieces
    and freed. The root stays gathered from forward to the end of backward. As with
    torch's FSDP, ``.parameters()`` yields the fp32 pieces this rank owns (plus frozen
    parameters, kept whole), so ``torch.optim.AdamW(model.parameters())`` steps the shards;
    :meth:`shard_parameters` gives them with their group key. Call
    :meth:`finish_gradient_synchronization` after backward. ``group_of(p)`` puts
    parameters in separate flat groups (the course: decayed 2-D weights apart from the
    rest); frozen parameters stay replicated.

    ``prefetch=False`` (the default) runs every all-gather and reduce-scatter on chapter 1's
    ring, synchronously: the mechanism, one thing at a time. ``prefetch=True`` overlaps
    them with compute as torch's FSDP does (see the module docstring), on torch's
    asynchronous collectives (``all_gather_into_tensor``; ``all_to_all_single`` for the
    reduce-scatter: :class:`_PendingReduce` says why), counting their bytes into
    ``counter`` all the same: the bytes sent equal the ring's.
    ``timeline`` records what each unit did when (:class:`Timeline`).
    """

    def __init__(
        self,
        module: nn.Module,
        group=None,
        compute_dtype: torch.dtype | None = None,
        unit_modules: list[nn.Module] | None = None,
        group_of: Callable[[nn.Parameter], int] = lambda p: 0,
        counter: C.CommCounter | None = None,
        prefetch: bool = False,
        timeline: Timeline | None = None,
    ) -> None:
        super().__init__()
        # No group: the whole world, named explicitly (strategies pass their Topology's).
        group = group if group is not None else dist.group.WORLD
        require_member(group, "FullyShardedDataParallel")
        check_same_model(module, group)
        broadcast_module(module, group)
        self.module, self.group, self.counter = module, group, counter
        self.world_size, rank = dist.get_world_size(group), dist.get_rank(group)
        self.require_sync = True  # False inside no_sync(): gradients stay whole, unreduced
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
        for i, unit in enumerate(self.units):
            unit.name = f"block {i}" if unit_modules is None else f"unit {i}"
        self.prefetch, self.timeline = prefetch, timeline
        self._ran: list[_Unit] = []  # the units whose forward ran in this step, in order
        self._forward_order: list[_Unit] = list(self.units)  # the guess: last step's order
        self._reducing: list[_PendingReduce] = []  # reduce-scatters in flight
        self._started: dict[int, float] = {}  # id(unit) -> when its compute began (timeline)
        for unit in self.units:
            unit.module.register_forward_pre_hook(lambda m, a, u=unit: self._pre_forward(u))
            unit.module.register_forward_hook(lambda m, a, out, u=unit: self._post_forward(u, out))
        for unit in self.all_units():
            for k, st in unit.sharded.items():
                hook = lambda t, u=unit, k=k: self._post_backward(u, k)  # noqa: E731
                st.full.register_post_accumulate_grad_hook(hook)
        # Registered, so .parameters(), .to() and optimizers see this rank's pieces.
        self.shards = nn.ParameterList([shard for _, shard in self.shard_parameters()])

    def all_units(self) -> list[_Unit]:
        return self.units + ([self.root] if self.root is not None else [])

    def shard_parameters(self) -> list[tuple[int, nn.Parameter]]:
        """Chapter 3: (group key, fp32 piece) for the optimizer; each rank's own pieces."""
        return [(k, st.shard) for u in self.all_units() for k, st in u.sharded.items()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._ran = []
        if self.root is not None:
            self._gather(self.root, [self._forward_order[0]] if self._forward_order else [])
        out = self.module(*args, **kwargs)
        if self.prefetch:  # a unit prefetched that did not run this time: free it
            for unit in self.units:
                if unit not in self._ran and unit.is_gathering():
                    unit.free()
            self._forward_order = self._ran
        if self.root is not None and not torch.is_grad_enabled():
            self.root.free()  # no backward will come to free it
        return out

    def _gather(self, unit: _Unit, then_prefetch: list[_Unit]) -> None:
        """Make ``unit``'s parameters whole; with prefetch, then post ``then_prefetch``'s."""
        if not self.prefetch:
            unit.gather(self.group, self.counter, self.timeline)
            return
        unit.start_gather(self.group, self.counter, self.world_size, self.timeline)
        unit.wait_gather()  # posted earlier by a prefetch, or just now
        for nxt in then_prefetch:
            nxt.start_gather(self.group, self.counter, self.world_size, self.timeline)

    def _next(self, order: list[_Unit], unit: _Unit) -> list[_Unit]:
        """The unit after ``unit`` in ``order`` (a list of at most one); none without prefetch."""
        if not self.prefetch or unit not in order:
            return []
        i = order.index(unit)
        return order[i + 1 : i + 2]

    def _pre_forward(self, unit: _Unit) -> None:
        """Before the unit's forward: all-gather its parameters (with prefetch: and the next's)."""
        self._gather(unit, then_prefetch=self._next(self._forward_order, unit))
        self._ran.append(unit)
        if self.timeline is not None:
            self._started[id(unit)] = self.timeline.now()

    def _post_forward(self, unit: _Unit, out: Any) -> None:
        """After the unit's forward: free its parameters; gather again before its backward."""
        unit.free()
        if self.timeline is not None:
            self.timeline.add(unit.name, "forward", self._started.pop(id(unit)))
        if torch.is_tensor(out) and out.requires_grad:
            out.register_hook(lambda grad: self._pre_backward(unit, grad))

    def _pre_backward(self, unit: _Unit, grad: torch.Tensor) -> torch.Tensor:
        """Before the unit's backward: all-gather its parameters again (freed after forward)."""
        backward_order = self._ran[::-1]  # backward runs the units in reverse forward order
        self._gather(unit, then_prefetch=self._next(backward_order, unit))
        if self.timeline is not None:
            self._started[id(unit)] = self.timeline.now()
        return grad

    def _post_backward(self, unit: _Unit, key: int) -> None:
        """When this backward has produced all the unit's gradients: reduce (or keep them)."""
        unit.ready.add(key)
        if len(unit.ready) < len(unit.sharded):
            return
        unit.ready.clear()
        if self.timeline is not None and id(unit) in self._started:
            self.timeline.add(unit.name, "backward", self._started.pop(id(unit)))
        if not self.require_sync:  # no_sync(): the whole gradient accumulates; re-gather later
            unit.free()
        elif self.prefetch:  # post this unit's reduce-scatter; finish those posted before
            for pending in self._reducing:
                pending.finish()
            self._reducing = unit.start_reduce(
                self.group, self.counter, self.world_size, self.timeline
            )
        else:
            unit.reduce(self.group, self.counter, self.world_size, self.timeline)

    def finish_gradient_synchronization(self) -> None:
        """Chapter 3: after backward, check every unit that ran has reduced its gradients.

        A unit that ran in forward but got no gradient (unused output) is freed and its
        pieces keep ``grad=None``, as on one device. A partly used unit is
        reduce-scattered here, so a unit must be used by every rank or by none in a step.
        """
        if not self.require_sync:
            raise RuntimeError(
                "finish_gradient_synchronization() inside no_sync(): call it after the "
                "backward that runs outside no_sync()"
            )
        for pending in self._reducing:  # the reduce-scatters still in flight
            pending.finish()
        self._reducing = []
        for unit in self.all_units():
            unit.ready.clear()
            if unit.reduced:
                unit.free()  # a backward prefetch of a unit that had no backward
                continue
            if any(st.full.grad is not None for st in unit.sharded.values()):
                unit.reduce(self.group, self.counter, self.world_size)  # some pieces unused
            else:
                unit.free()
                unit.reduced = True

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Chapter 3: clip by the global norm: each rank's pieces, summed over the group."""
        return clip_grad_norm_([s for _, s in self.shard_parameters()], max_norm, self.group)

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
        in_flight = [t for r in self._reducing for t in (r.grad, r.received)]  # prefetch
        return {
            "params": held_bytes([*shards, *gathered]),  # gathered: 0 bytes once freed
            "grads": held_bytes([*(s.grad for s in shards), *in_flight]),
            "optimizer": state_bytes(optimizer),
        }

    def _flat_groups(self) -> Iterator[tuple[_ShardedTensors, list[str]]]:
        """Every flat group with the (first) names of its parameters."""
        for unit in self.all_units():
            for k, st in unit.sharded.items():
                yield st, [self.names[id(p)][0] for p in unit.groups[k]]

    def state_pieces(self, optimizer: torch.optim.Optimizer) -> tuple[Pieces, Shapes]:
        """Chapter 3: each rank writes its fp32 pieces and their optimizer state, no gathering."""
        first = dist.get_rank(self.group) == 0
        pieces, shapes = replicated_pieces(self.module, optimizer, write=first)  # frozen, buffers
        for st, names in self._flat_groups():
            got, got_shapes = flat_state_pieces(st.layout, names, st.shard, optimizer, first)
            pieces.update(got)
            shapes.update(got_shapes)
        return pieces, shapes

    @torch.no_grad()
    def load_state_pieces(
        self, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
    ) -> None:
        """Chapter 3: cut this rank's pieces out of whole tensors written at any world size."""
        for name, t in [*self.module.named_parameters(), *self.module.named_buffers()]:
            t.copy_(tensors[f"model/{name}"])
        for st, names in self._flat_groups():
            whole = [tensors[f"model/{n}"] for n in names]
            st.shard.copy_(st.layout.shard(st.layout.flatten(whole, st.shard)))
            load_flat_optimizer_state(st.layout, names, st.shard, optimizer, tensors)


def decay_groups(fsdp: FullyShardedDataParallel, weight_decay: float) -> list[dict[str, Any]]:
    """Chapter 3: AdamW's two groups over the shards, built with ``group_of = p.dim() >= 2``.

    The pieces are 1-D, so their group key, not their shape, says which ones hold the
    2-D weights that are decayed.
    """
    shards = fsdp.shard_parameters()
    return [
        {"params": [s for k, s in shards if k == 1], "weight_decay": weight_decay},
        {"params": [s for k, s in shards if k == 0], "weight_decay": 0.0},
    ]


# ---------------------------------------------------------------------------------------
# The training loop's strategy: `python -m course_lib train --strategy zero3`
# ---------------------------------------------------------------------------------------


class Zero3Strategy(Strategy):
    """Chapter 3: the data-parallel step on :class:`FullyShardedDataParallel` (ZeRO-3)."""

    name = "zero3"

    def __init__(
        self, ctx: Any = None, compute_dtype: torch.dtype | None = None, prefetch: bool = False
    ) -> None:
        super().__init__(ctx)
        self.compute_dtype, self.prefetch = compute_dtype, prefetch

    def wrap(self, module: GPT, cfg: TrainConfig):
        fsdp = FullyShardedDataParallel(
            module,
            group=self.topology.dp_group,
            compute_dtype=self.compute_dtype,
            group_of=lambda p: int(p.dim() >= 2),  # 1: the 2-D weights AdamW decays
            prefetch=self.prefetch,
        )
        groups = decay_groups(fsdp, cfg.weight_decay)
        return fsdp, torch.optim.AdamW(groups, **adamw_settings(cfg)), fsdp
