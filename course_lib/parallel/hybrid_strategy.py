"""Chapter 7: 3D parallelism as a training-loop strategy (``--dp D --pp P --tp T``).

:class:`HybridStrategy` plugs chapter 7's :func:`~course_lib.parallel.compose.parallelize`
into ``course_lib.train.train``: each data-parallel replica draws its rows of the global
batch (every pipeline and tensor rank of a replica the same rows), :meth:`Hybrid.step
<course_lib.parallel.compose.Hybrid.step>` runs the schedule, combines the gradients and
steps the optimizer.

:class:`HybridSync` writes and reads the course's sharded checkpoints (chapter 3's format:
a piece is a run of the whole tensor's row-major flattening) under the plain GPT's names,
so a checkpoint written on any (dp, pp, tp, ZeRO stage) grid resumes on any other, on one
device, or with the strategies of chapters 2, 3, 5 and 6, and back. Every local tensor, whether a
parameter, a tensor-parallel slice or a ZeRO piece of a flat buffer, is described the same
way: a list of :class:`Segment`\\ s saying where each of its elements sits in a whole
tensor. Writing cuts those positions into runs; loading gathers them back.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from course_lib.checkpoint import Piece, Pieces, Shapes, whole_piece
from course_lib.flat import FlatLayout
from course_lib.launch import DistContext
from course_lib.model import GPT, GPTConfig
from course_lib.parallel.compose import Hybrid, check_hybrid, parallelize
from course_lib.parallel.tensor_parallel import TPShard
from course_lib.topology import Topology, factorisations
from course_lib.train import Strategy, TrainConfig, adamw_settings, build_model, optimizer_groups

HYBRID_SCHEDULES = ("1f1b", "gpipe")  # the pipeline schedules composed with dp and tp


def check_hybrid_run(
    config: GPTConfig,
    dp: int,
    pp: int,
    tp: int,
    *,
    schedule: str = "1f1b",
    microbatches: int | None = None,
    sequence_parallel: bool = False,
    zero: int = 0,
    batch_size: int | None = None,
    seq_len: int | None = None,
) -> int:
    """Chapter 7: refuse a 3D run that cannot work, before any rank starts; the micro-batches.

    ``microbatches`` defaults to two per stage. Used by the CLI and by the strategy.
    """
    for name, size in (("dp", dp), ("pp", pp), ("tp", tp)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be an integer >= 1 (ranks on that axis), got {size!r}")
    if schedule not in HYBRID_SCHEDULES:
        raise ValueError(
            f"schedule {schedule!r} is not composed with data and tensor parallelism (chapter 7 "
            f"runs {' and '.join(HYBRID_SCHEDULES)}); choose one of them, or run {schedule!r} "
            "alone with --strategy pp (chapter 5)"
        )
    m = microbatches if microbatches is not None else 2 * pp
    if m < 1:
        raise ValueError(f"microbatches={m} must be >= 1 (default: 2 per stage)")
    check_hybrid(config, dp, pp, tp, schedule=schedule, microbatches=m,
                 sequence_parallel=sequence_parallel, global_batch=batch_size, seq_len=seq_len,
                 zero_stage=zero)  # fmt: skip
    return m


# ---------------------------------------------------------------------------------------
# Where each local element sits in the whole tensor: one mapping for every checkpoint piece
# ---------------------------------------------------------------------------------------


def whole_positions(shape: tuple[int, ...], shard: TPShard | None) -> torch.Tensor:
    """Chapter 7: (numel,) int64: where each element of a local tensor of ``shape`` sits in
    the whole tensor's row-major flattening; -1 for a tensor-parallel padding entry.

    A replicated tensor (``shard`` None) is the whole tensor: 0, 1, 2, ...
    """
    if shard is None:
        return torch.arange(math.prod(shape))
    positions = torch.arange(math.prod(shard.full_shape)).view(shard.full_shape) + 1
    return shard.take(positions).flatten() - 1  # take() zeroes the padding: 0 - 1 = -1


def runs(where: torch.Tensor, values: torch.Tensor) -> list[Piece]:
    """Chapter 7: ``values[i]`` belongs at position ``where[i]`` (-1: nowhere) of a whole
    tensor; cut them into checkpoint Pieces, one per run of consecutive positions."""
    keep = where >= 0
    where, values = where[keep], values.detach().reshape(-1)[keep.to(values.device)]
    breaks = ((where[1:] - where[:-1]) != 1).nonzero().flatten() + 1
    pieces, start = [], 0
    for stop in [*breaks.tolist(), where.numel()]:
        if stop > start:
            first = int(where[start])
            pieces.append(Piece(first, first + stop - start, values[start:stop]))
        start = stop
    return pieces


def gather_positions(whole: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Chapter 7: the inverse of :func:`runs`: ``whole``'s elements at ``where`` (-1: zero)."""
    values = whole.reshape(-1)[where.clamp(min=0)]  # (len(where),)
    return values.masked_fill(where < 0, 0)


@dataclass
class Segment:
    """Chapter 7: elements ``[start, stop)`` of a local flat buffer are the whole tensor
    ``name``'s elements at positions ``where`` ((stop - start,) int64, -1 = padding)."""

    name: str  # the plain GPT's parameter name (the tied head copy keeps its own name)
    where: torch.Tensor
    start: int
    stop: int


def parameter_segments(name: str, p: torch.Tensor) -> list[Segment]:
    """A parameter held whole or as a tensor-parallel slice: one segment over all of it."""
    where = whole_positions(tuple(p.shape), getattr(p, "tp_shard", None))
    return [Segment(name, where, 0, p.numel())]


def flat_segments(
    names: list[str], params: list[nn.Parameter], layout: FlatLayout
) -> list[Segment]:
    """A ZeRO piece ``[layout.start, + shard_numel)`` of a flat buffer of ``params``.

    Tensor ``i`` spans ``[layout.offsets[i], + numels[i])`` of the buffer; the overlap of
    each with the piece keeps its elements' whole-tensor positions. The padding is in none.
    """
    end, out = layout.start + layout.shard_numel, []
    for name, p, offset, numel in zip(names, params, layout.offsets, layout.numels, strict=True):
        lo, hi = max(offset, layout.start), min(offset + numel, end)
        if lo < hi:
            where = parameter_segments(name, p)[0].where[lo - offset : hi - offset]
            out.append(Segment(name, where, lo - layout.start, hi - layout.start))
    return out


@dataclass
class Unit:
    """Chapter 7: a tensor the optimizer steps (a parameter, or a ZeRO piece ``zg.shard``),
    the names of the parameters it covers, and where its elements belong."""

    tensor: torch.Tensor
    names: list[str]
    segments: list[Segment]


class HybridSync:
    """Chapter 7: the GradientSync of a 3D run: checkpoints, state dicts, memory.

    :meth:`Hybrid.step <course_lib.parallel.compose.Hybrid.step>` combines and clips the
    gradients itself, so ``no_sync`` and ``finish_gradient_synchronization`` do nothing.
    Each element is written exactly once: replicated tensors by tp rank 0 only, everything
    by dp rank 0 only unless ZeRO cuts it over dp, and never the last stage's copy of the
    tied embedding (``lm_head.weight`` is ``wte.weight``).
    """

    def __init__(self, hybrid: Hybrid, model: GPT) -> None:
        self.hybrid, self.topology = hybrid, hybrid.topology
        self.tied = model.config.tie_weights
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        self.named = hybrid.named_parameters()

    def canonical(self, name: str) -> str:
        """The checkpoint name: the tied head copy is the embedding."""
        return "wte.weight" if self.tied and name == "lm_head.weight" else name

    def units(self) -> list[Unit]:
        """What the optimizer steps: the ZeRO pieces, then any parameter outside them."""
        names = {id(p): n for n, p in self.named}
        out, covered = [], set()
        for zg in self.hybrid.zero_groups:
            zg_names = [names[id(p)] for p in zg.params]
            out.append(Unit(zg.shard, zg_names, flat_segments(zg_names, zg.params, zg.layout)))
            covered |= {id(p) for p in zg.params}
        for name, p in self.named:
            if id(p) not in covered:
                out.append(Unit(p, [name], parameter_segments(name, p)))
        return out

    def _writes(self, name: str, sliced: bool, cut_over_dp: bool) -> bool:
        """Whether this rank writes its elements of ``name`` (each element exactly once).

        ``sliced``: this rank holds a tensor-parallel slice, not the replicated whole;
        ``cut_over_dp``: a ZeRO piece, which no other replica holds.
        """
        t = self.topology
        if self.canonical(name) != name:
            return False  # the last stage's copy of the tied matrix
        if t.tp_rank != 0 and not sliced:
            return False  # replicated over tp: tp rank 0 writes it
        return t.dp_rank == 0 or cut_over_dp

    def state_pieces(self, optimizer: torch.optim.Optimizer) -> tuple[Pieces, Shapes]:
        """This rank's runs of the whole model and optimizer tensors, plain GPT names."""
        pieces: Pieces = {}
        sliced = {n: hasattr(p, "tp_shard") for n, p in self.named}
        zero = {id(zg.shard) for zg in self.hybrid.zero_groups}
        keys: dict[str, bool] = {}  # optimizer state key -> is a 0-d scalar (Adam's step)
        for unit in self.units():
            state = optimizer.state.get(unit.tensor, {})
            state = {k: v for k, v in state.items() if torch.is_tensor(v)}
            keys.update({k: v.dim() == 0 for k, v in state.items()})
            for key, value in state.items():  # a 0-d step: whole, once per parameter
                for name in unit.names if value.dim() == 0 else []:
                    if self._writes(name, False, False):
                        pieces[f"optimizer/{name}/{key}"] = [whole_piece(value)]
            shaped = [(None, unit.tensor), *[(k, v) for k, v in state.items() if v.dim()]]
            for seg in unit.segments:
                if not self._writes(seg.name, sliced[seg.name], id(unit.tensor) in zero):
                    continue
                for key, value in shaped:  # the parameter (key None), then Adam's m and v
                    name = f"model/{seg.name}" if key is None else f"optimizer/{seg.name}/{key}"
                    part = value.detach().reshape(-1)[seg.start : seg.stop]
                    pieces.setdefault(name, []).extend(runs(seg.where, part))
        shapes: Shapes = {f"model/{n}": s for n, s in self.shapes.items()}
        for key, scalar in keys.items():
            shapes.update({f"optimizer/{n}/{key}": () if scalar else self.shapes[n]
                           for n in self.trainable})  # fmt: skip
        return pieces, shapes

    @torch.no_grad()
    def load_state_pieces(
        self, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
    ) -> None:
        """Cut the whole checkpoint tensors back to this rank's slices and ZeRO pieces."""
        for name, p in self.named:  # under ZeRO this fills the flat buffers through views
            seg = parameter_segments(name, p)[0]
            whole = tensors[f"model/{self.canonical(name)}"]
            p.copy_(gather_positions(whole, seg.where).view(p.shape))
        for unit in self.units():
            prefix = f"optimizer/{self.canonical(unit.names[0])}/"
            keys = sorted(k[len(prefix) :] for k in tensors if k.startswith(prefix))
            state = {key: self._local_state(unit, key, tensors) for key in keys}
            if state:
                optimizer.state[unit.tensor] = state

    def _local_state(self, unit: Unit, key: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """This unit's optimizer state ``key`` from the whole tensors (a 0-d step: as is)."""
        first = tensors[f"optimizer/{self.canonical(unit.names[0])}/{key}"]
        if first.dim() == 0:
            return first.clone()  # stays on the CPU, as torch keeps it
        flat = torch.zeros(unit.tensor.numel(), dtype=first.dtype)  # padding stays zero
        for seg in unit.segments:
            whole = tensors[f"optimizer/{self.canonical(seg.name)}/{key}"]
            flat[seg.start : seg.stop] = gather_positions(whole, seg.where)
        return flat.view(unit.tensor.shape).to(unit.tensor.device)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        yield  # the schedule accumulates over its micro-batches by itself

    def finish_gradient_synchronization(self) -> None:
        pass  # Hybrid.step reduces over dp (and sums the tied matrix over pp) itself

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.hybrid.parameters()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.hybrid.full_state_dict()

    def memory_bytes(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
        return self.hybrid.memory_bytes()


class HybridStrategy(Strategy):
    """Chapter 7: ``--dp D --pp P --tp T``: DP x PP x TP on ``D * P * T`` ranks."""

    name = "hybrid"

    def __init__(
        self,
        ctx: DistContext | None = None,
        dp: int = 1,
        pp: int = 1,
        tp: int = 1,
        schedule: str = "1f1b",
        microbatches: int | None = None,
        sequence_parallel: bool = False,
        zero: int = 0,
    ) -> None:
        super().__init__(ctx)
        self.dp, self.pp, self.tp = dp, pp, tp
        self.schedule, self.microbatches = schedule, microbatches
        self.sequence_parallel, self.zero = sequence_parallel, zero
        world = ctx.world_size if ctx is not None else 1
        if dp * pp * tp != world:
            valid = ", ".join(f"({a},{b},{c})" for a, b, c in factorisations(world))
            raise ValueError(
                f"dp={dp} x pp={pp} x tp={tp} = {dp * pp * tp} ranks, but the world has "
                f"{world}; launch {dp * pp * tp} ranks, or choose (dp, pp, tp) among {valid}"
            )

    @property
    def data_world_size(self) -> int:  # the replicas, even before setup() builds the grid
        return self.topology.dp if self.topology is not None else self.dp

    def make_topology(self) -> Topology:
        return Topology(self.dp, self.pp, self.tp)

    def wrap(self, module: GPT, cfg: TrainConfig):
        m = check_hybrid_run(module.config, self.dp, self.pp, self.tp, schedule=self.schedule,
                             microbatches=self.microbatches,
                             sequence_parallel=self.sequence_parallel, zero=self.zero,
                             batch_size=cfg.batch_size, seq_len=cfg.seq_len)  # fmt: skip
        hybrid = parallelize(module, self.topology, schedule=self.schedule, microbatches=m,
                             sequence_parallel=self.sequence_parallel, zero_stage=self.zero,
                             seed=cfg.seed)  # fmt: skip
        groups = optimizer_groups(list(hybrid.parameters()), cfg)
        groups = [g for g in groups if g["params"]]  # a stage may hold no 1-D parameter
        optimizer = hybrid.build_optimizer(torch.optim.AdamW, groups, **adamw_settings(cfg))
        return hybrid, optimizer, HybridSync(hybrid, module)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        return self.model.step(x, y, lr, self.train_config.grad_clip)  # the global mean

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return self.model.evaluate(x, y)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer state."""
        return self.model.memory_bytes()

    def full_model(self) -> GPT:
        model = build_model(self.model_config, 0, self.device)  # weights replaced below
        model.load_state_dict(self.sync.full_state_dict())
        return model


def hybrid_strategy(ctx: DistContext | None = None, **options: Any) -> HybridStrategy:
    """``make_strategy("hybrid", ctx, dp=..., pp=..., tp=..., schedule=..., microbatches=...,
    sequence_parallel=..., zero=...)``."""
    return HybridStrategy(ctx, **options)
