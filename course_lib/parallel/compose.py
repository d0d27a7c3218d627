"""Chapter 7: 3D parallelism: data x pipeline x tensor parallelism, composed in one place.

:func:`parallelize` applies the strategies in the order torchtitan and Megatron-LM use,
each on its own group of the :class:`~course_lib.topology.Topology`:

1. **tensor parallel inside a stage** (``tp_group``): chapter 6's
   :func:`~course_lib.parallel.tensor_gpt.tensor_parallelize` slices every layer; the loss
   is the vocabulary-parallel cross-entropy. At ``tp = 1`` it is the same code on a group
   of one (every collective a no-op), so there is one path.
2. **pipeline stages** (``pp_group``): chapter 5's
   :class:`~course_lib.parallel.pipeline.PipelineParallel` cuts the tensor-parallel GPT
   (it has the same ``embed``/``blocks``/``head`` pieces) into stages and runs a schedule;
   tp rank ``t`` of one stage talks only to tp rank ``t`` of the next, which holds the same
   slices. The tied embedding/head gradient is summed between the first and last stage,
   slice by slice.
3. **data parallel across replicas** (``dp_group``): after the schedule, every local
   gradient is all-reduced and divided by ``dp`` (chapter 2's rule, on a flat buffer).
   With ``zero_stage=1`` (chapter 3's ZeRO-1, the "distributed optimizer" of Megatron-LM)
   each replica instead lays its stage's parameters end to end in one flat buffer per
   optimizer group, reduce-scatters the flat gradient over ``dp``, steps the optimizer on
   its 1/dp piece only and all-gathers the updated parameters: the same bytes as the
   all-reduce, the optimizer state cut dp ways. ``zero_stage=2`` also frees the whole
   gradients once reduced, keeping 1/dp of them until the next step. The micro-batches of
   the schedule still accumulate whole gradients during the backward (reducing each
   micro-batch's gradient would cost m times the bytes; DeepSpeed refuses ZeRO-2 with
   pipeline parallelism for that reason), so stage 2 saves memory between steps and at
   the optimizer step, not at the backward's peak.

:class:`Hybrid` holds the result; :meth:`Hybrid.build_optimizer` makes its optimizer and
:meth:`Hybrid.step` runs one training step. Clipping
uses the global norm with every piece counted exactly once: tensor-parallel slices summed
over ``tp``, replicated tensors once per stage, the stages summed over ``pp``, and the
tied matrix counted on the first stage only. The ``dp`` replicas hold equal gradients
after the all-reduce, so the norm needs no ``dp`` reduction.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn

from course_lib import collectives as C
from course_lib.flat import FlatLayout
from course_lib.memory import held_bytes, state_bytes
from course_lib.model import GPT, GPTConfig
from course_lib.parallel.common import gather_object, global_mean
from course_lib.parallel.pipeline import PipelineParallel
from course_lib.parallel.pipeline_strategy import SCHEDULES, check_pipeline
from course_lib.parallel.tensor_gpt import (
    TensorParallelGPT,
    check_tensor_parallel,
    squared_grad_norms,
    sync_sequence_parallel_grads,
    tensor_parallelize,
)
from course_lib.topology import Topology
from course_lib.train import set_lr


def check_hybrid(
    config: GPTConfig,
    dp: int,
    pp: int,
    tp: int,
    *,
    schedule: str,
    microbatches: int,
    sequence_parallel: bool = False,
    global_batch: int | None = None,
    seq_len: int | None = None,
    zero_stage: int = 0,
) -> None:
    """Chapter 7: refuse a (dp, pp, tp) run that cannot work, naming the fix, before any message."""
    if zero_stage not in (0, 1, 2):
        raise ValueError(
            f"zero_stage={zero_stage}: the dp axis takes ZeRO stage 0 (plain all-reduce), 1 "
            "(optimizer state sharded) or 2 (+ gradients); stage 3 shards the parameters, "
            "which the pipeline stages already cut: use 0, 1 or 2"
        )
    if schedule == "interleaved":
        raise ValueError(
            "the interleaved schedule (several chunks per rank) is not composed yet; "
            f"choose one of {sorted(set(SCHEDULES) - {'interleaved'})}"
        )
    check_tensor_parallel(config, tp, seq_len, sequence_parallel)
    if pp > config.n_layer:
        raise ValueError(
            f"pp={pp} stages but only n_layer={config.n_layer} blocks: every stage needs a "
            f"block; choose pp <= {config.n_layer}"
        )
    if global_batch is not None and global_batch % (dp * microbatches):
        raise ValueError(
            f"a global batch of {global_batch} sequences does not split into dp={dp} replicas "
            f"x {microbatches} micro-batches; use a global batch divisible by "
            f"{dp * microbatches}, or change dp or the micro-batches"
        )
    replica_batch = global_batch // dp if global_batch is not None else microbatches
    check_pipeline(pp, config.n_layer, replica_batch, schedule, microbatches, 1)


def _drop_other_stages(model: TensorParallelGPT, pipeline: PipelineParallel) -> None:
    """Free the blocks another stage runs: this rank keeps only its own stages' layers."""
    mine = {i for stage in pipeline.stages for i in stage.block_ids}
    for i in range(len(model.blocks)):
        if i not in mine:
            model.blocks[i] = nn.Identity()  # never called: the stages hold the blocks they run


class ZeroGroup:
    """Chapter 7: one optimizer group's parameters in a flat buffer cut over the dp axis.

    Chapter 3's layout (:class:`~course_lib.flat.FlatLayout`): the parameters become views
    of ``flat``; ``shard`` (a view of this replica's 1/dp piece) is what the optimizer
    steps. ``kinds`` marks each element of the piece for the gradient norm: 1 a
    tensor-parallel slice (summed over tp), 2 a replicated tensor (counted once), 0 not
    counted (the last stage's copy of the tied matrix, and the padding).
    """

    def __init__(self, named: list[tuple[str, nn.Parameter]], counted: set[str],
                 topology: Topology) -> None:  # fmt: skip
        self.params = [p for _, p in named]
        self.layout = FlatLayout([p.shape for p in self.params], topology.dp_rank, topology.dp)
        with torch.no_grad():
            self.flat = self.layout.flatten(self.params, self.params[0])  # (padded,)
        for p, view in zip(self.params, self.layout.views(self.flat), strict=True):
            p.data = view  # the stage's parameters now live in the flat buffer
        self.shard = nn.Parameter(self.layout.shard(self.flat))  # a view: no extra copy
        kinds = torch.zeros(self.layout.padded, dtype=torch.int8)
        for (name, p), start, n in zip(named, self.layout.offsets, self.layout.numels,
                                       strict=True):  # fmt: skip
            if name in counted:
                kinds[start : start + n] = 1 if hasattr(p, "tp_shard") else 2
        self.kinds = self.layout.shard(kinds).to(self.flat.device)  # (shard_numel,)

    @torch.no_grad()
    def reduce_scatter(self, group, stage: int, dp: int) -> None:
        """``shard.grad`` = the dp-mean gradient of this piece; stage 2 frees the whole ones."""
        grads = self.layout.flatten([p.grad for p in self.params], self.flat)  # (padded,)
        if stage == 1:  # keep the whole gradients, now as views of the reduced buffer
            for p, view in zip(self.params, self.layout.views(grads), strict=True):
                p.grad = view
        else:
            for p in self.params:
                p.grad = None
        piece = C.ring_reduce_scatter(grads, group)  # sum of our piece; the rest: scratch
        piece.div_(dp)
        self.shard.grad = piece if stage == 1 else piece.clone()  # stage 2: 1/dp kept

    def squared_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sliced, replicated) squared norms of this piece's gradient, float64, shape (1,)."""
        square = self.shard.grad.double().pow(2)
        return square[self.kinds == 1].sum().view(1), square[self.kinds == 2].sum().view(1)


class Hybrid:
    """Chapter 7: this rank's piece of a DP x PP x TP GPT, and one training step over it.

    Built by :func:`parallelize`. ``pipeline`` holds this rank's stages, whose layers are
    ``tp``-way slices; ``model`` is the tensor-parallel GPT they were cut from.
    """

    def __init__(
        self,
        model: TensorParallelGPT,
        pipeline: PipelineParallel,
        topology: Topology,
        zero_stage: int = 0,
    ) -> None:
        self.model, self.pipeline, self.topology = model, pipeline, topology
        self.zero_stage = zero_stage
        self.optimizer: torch.optim.Optimizer | None = None  # made by build_optimizer()
        self.zero_groups: list[ZeroGroup] = []  # the flat dp-sharded groups (ZeRO >= 1)
        tied = model.config.tie_weights
        named = pipeline.named_parameters()  # the plain GPT's names, each Parameter once
        # the last stage's copy of the tied matrix is the first stage's: count it there only
        self.owned = [(n, p) for n, p in named if not (tied and n == "lm_head.weight")]
        self.last_grad_norm = float("nan")  # the norm before clipping, of the last step

    def parameters(self) -> Iterator[nn.Parameter]:
        """The parameters this rank updates (its stages' slices), each once."""
        return iter(self.pipeline.parameters())

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters under the plain GPT's names (a slice if ``tp_shard``)."""
        return self.pipeline.named_parameters()

    def build_optimizer(
        self,
        optimizer_class: type[torch.optim.Optimizer],
        param_groups: list[dict] | None = None,
        **defaults,
    ) -> torch.optim.Optimizer:
        """This rank's optimizer: over its parameters, or over its dp pieces under ZeRO.

        ``param_groups`` are torch's groups (``{"params": [...], "weight_decay": ...}``) over
        :meth:`parameters`; the default is one group of them all. Under ZeRO each group
        becomes one flat buffer and the optimizer sees only this replica's piece of it, so
        it must be elementwise (SGD, Adam, AdamW). Call once, before the first step.
        """
        if self.optimizer is not None:
            raise RuntimeError("build_optimizer() was already called for this Hybrid")
        groups = param_groups or [{"params": list(self.parameters())}]
        if self.zero_stage == 0:
            self.optimizer = optimizer_class(groups, **defaults)
            return self.optimizer
        names = {id(p): n for n, p in self.named_parameters()}
        counted = {n for n, _ in self.owned}
        inner = []
        for g in groups:
            named = [(names[id(p)], p) for p in g["params"] if p.requires_grad]
            if named:
                zg = ZeroGroup(named, counted, self.topology)
                self.zero_groups.append(zg)
                inner.append({**g, "params": [zg.shard]})
        self.optimizer = optimizer_class(inner, **defaults)
        return self.optimizer

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float, grad_clip: float) -> float:
        """One step on this replica's (B / dp, T) batch; every rank returns the global mean loss.

        Every tp rank of a stage must pass the same batch; the pipeline cuts it into
        micro-batches. ``grad_clip`` <= 0 turns clipping off.
        """
        if self.optimizer is None:
            raise RuntimeError("call build_optimizer(torch.optim.AdamW, ...) before step()")
        self._check_batch(x)
        set_lr(self.optimizer, lr)
        for stage in self.pipeline.stages:
            stage.train()
        self._zero_grad()
        loss = self.pipeline.run(x, y)  # also sums the tied matrix's halves over pp
        if self.model.sequence_parallel:  # partial sums over this rank's positions
            sync_sequence_parallel_grads(self.model, self.model.comm)
        if self.zero_stage:
            for zg in self.zero_groups:
                zg.reduce_scatter(self.topology.dp_group, self.zero_stage, self.topology.dp)
        else:
            self._all_reduce_mean_gradients()
        self.last_grad_norm = self.grad_norm()
        if grad_clip > 0:
            scale = min(1.0, grad_clip / (self.last_grad_norm + 1e-6))
            for p in self._stepped():
                if p.grad is not None:
                    p.grad.mul_(scale)
        self.optimizer.step()
        for zg in self.zero_groups:  # every replica gets every updated piece
            C.ring_all_gather(zg.flat, self.topology.dp_group)
        return global_mean(torch.tensor(loss), self.topology.dp_group)

    def _stepped(self) -> list[nn.Parameter]:
        """The tensors the optimizer updates: the parameters, or the dp pieces under ZeRO."""
        if self.zero_stage:
            return [zg.shard for zg in self.zero_groups]
        return list(self.parameters())

    def _zero_grad(self) -> None:
        for p in [*self.parameters(), *self._stepped()]:
            p.grad = None

    def memory_bytes(self) -> dict[str, int]:
        """Chapter 7: bytes this rank holds for parameters, gradients and optimizer state."""
        params = list(self.parameters())
        grads = [p.grad for p in params] + [zg.shard.grad for zg in self.zero_groups]
        return {
            "params": held_bytes(params),
            "grads": held_bytes(grads),
            "optimizer": state_bytes(self.optimizer) if self.optimizer is not None else 0,
        }

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The global mean loss of this replica's batch, forwards only (every rank returns it)."""
        self._check_batch(x)
        for stage in self.pipeline.stages:
            stage.eval()
        loss = self.pipeline.evaluate(x, y)
        return global_mean(torch.tensor(loss), self.topology.dp_group)

    def _check_batch(self, x: torch.Tensor) -> None:
        m, tp = self.pipeline.m, self.topology.tp
        if x.dim() != 2 or x.shape[0] % m:
            raise ValueError(
                f"this replica's batch has shape {tuple(x.shape)}; it must be (B / dp, T) with "
                f"B / dp divisible by the {m} micro-batches"
            )
        check_tensor_parallel(self.model.config, tp, x.shape[1], self.model.sequence_parallel)

    @torch.no_grad()
    def _all_reduce_mean_gradients(self) -> None:
        """Data parallel: every local gradient becomes the mean over the dp replicas."""
        if self.topology.dp == 1:
            return
        params = [p for p in self.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # unused on this replica: it still takes part in the sum
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # one message for them all
        dist.all_reduce(flat, group=self.topology.dp_group)
        flat /= self.topology.dp
        for p, piece in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad.copy_(piece.view_as(p))

    @torch.no_grad()
    def grad_norm(self) -> float:
        """The global gradient norm: slices summed over tp, replicated ones once, stages over pp.

        Under ZeRO each replica holds 1/dp of the reduced gradient: the pieces' squares are
        summed over dp first.
        """
        if self.zero_stage:
            pieces = [zg.squared_norms() for zg in self.zero_groups]
            both = torch.cat([sum(s for s, _ in pieces), sum(r for _, r in pieces)])
            dist.all_reduce(both, group=self.topology.dp_group)
            sliced, replicated = both[:1], both[1:]
        else:
            sliced, replicated = squared_grad_norms([p for _, p in self.owned])
        dist.all_reduce(sliced, group=self.topology.tp_group)
        stage = sliced + replicated  # the same on every tp rank of this stage
        dist.all_reduce(stage, group=self.topology.pp_group)
        return stage.sqrt().item()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The plain GPT's state dict, whole, on every rank (a collective over tp, then pp)."""
        mine = {n: (p.detach().cpu().clone(), getattr(p, "tp_shard", None)) for n, p in self.owned}
        stage = gather_object(mine, self.topology.tp_group)  # the slices of this stage
        full: dict[str, torch.Tensor] = {}
        for slices in gather_object(stage, self.topology.pp_group):
            for name, (data, shard) in slices[0].items():
                if shard is None:  # replicated: every tp rank holds it whole
                    full[name] = data
                    continue
                whole = torch.zeros(shard.full_shape, dtype=data.dtype)
                for part in slices:
                    part[name][1].put(whole, part[name][0])
                full[name] = whole
        if self.model.config.tie_weights:
            full["lm_head.weight"] = full["wte.weight"]
        return full


def parallelize(
    model: GPT,
    topology: Topology,
    *,
    schedule: str = "1f1b",
    microbatches: int,
    sequence_parallel: bool = False,
    zero_stage: int = 0,
    seed: int = 0,
    global_batch: int | None = None,
    seq_len: int | None = None,
) -> Hybrid:
    """Chapter 7: ``model`` as this rank's piece of a ``topology.dp x pp x tp`` run.

    ``model`` must hold the same weights on every rank (build it with the same seed); it is
    not modified. Tensor parallel first (``sequence_parallel`` splits the stream between
    the tensor-parallel regions, and between stages, along T), then pipeline stages with
    ``schedule`` over ``microbatches``, then data parallel over the replicas, with ZeRO
    stage ``zero_stage`` (0, 1 or 2) on that axis. Then call
    :meth:`Hybrid.build_optimizer`.
    ``global_batch`` and ``seq_len``, when given, are checked here; the batch each step
    gets is checked again there. ``seed`` seeds the tensor-parallel dropout stream.
    """
    if not isinstance(model, GPT):
        raise ValueError(
            f"parallelize takes the plain course_lib.model.GPT, got {type(model).__name__}; "
            "it applies tensor parallelism itself"
        )
    check_hybrid(model.config, topology.dp, topology.pp, topology.tp, schedule=schedule,
                 microbatches=microbatches, sequence_parallel=sequence_parallel,
                 global_batch=global_batch, seq_len=seq_len, zero_stage=zero_stage)  # fmt: skip
    sliced = tensor_parallelize(model, topology, sequence_parallel, seed=seed)
    shards = topology.tp if sequence_parallel else 1  # the stream between stages: T / tp
    pipeline = PipelineParallel(sliced, topology, SCHEDULES[schedule], microbatches,
                                criterion=sliced.loss, sequence_shards=shards)  # fmt: skip
    _drop_other_stages(sliced, pipeline)
    return Hybrid(sliced, pipeline, topology, zero_stage)
