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
   ZeRO on this axis is a later step and is not here.

:class:`Hybrid` holds the result; :meth:`Hybrid.step` is one training step. Clipping
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
) -> None:
    """Chapter 7: refuse a (dp, pp, tp) run that cannot work, naming the fix, before any message."""
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


class Hybrid:
    """Chapter 7: this rank's piece of a DP x PP x TP GPT, and one training step over it.

    Built by :func:`parallelize`. ``pipeline`` holds this rank's stages, whose layers are
    ``tp``-way slices; ``model`` is the tensor-parallel GPT they were cut from.
    """

    def __init__(
        self, model: TensorParallelGPT, pipeline: PipelineParallel, topology: Topology
    ) -> None:
        self.model, self.pipeline, self.topology = model, pipeline, topology
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

    def step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        lr: float,
        grad_clip: float,
    ) -> float:
        """One step on this replica's (B / dp, T) batch; every rank returns the global mean loss.

        Every tp rank of a stage must pass the same batch; the pipeline cuts it into
        micro-batches. ``grad_clip`` <= 0 turns clipping off.
        """
        self._check_batch(x)
        set_lr(optimizer, lr)
        for stage in self.pipeline.stages:
            stage.train()
        optimizer.zero_grad(set_to_none=True)
        loss = self.pipeline.run(x, y)  # also sums the tied matrix's halves over pp
        if self.model.sequence_parallel:  # partial sums over this rank's positions
            sync_sequence_parallel_grads(self.model, self.model.comm)
        self._all_reduce_mean_gradients()
        self.last_grad_norm = self.grad_norm()
        if grad_clip > 0:
            scale = min(1.0, grad_clip / (self.last_grad_norm + 1e-6))
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(scale)
        optimizer.step()
        return global_mean(torch.tensor(loss), self.topology.dp_group)

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
        """The global gradient norm: slices summed over tp, replicated ones once, stages over pp."""
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
    seed: int = 0,
    global_batch: int | None = None,
    seq_len: int | None = None,
) -> Hybrid:
    """Chapter 7: ``model`` as this rank's piece of a ``topology.dp x pp x tp`` run.

    ``model`` must hold the same weights on every rank (build it with the same seed); it is
    not modified. Tensor parallel first (``sequence_parallel`` splits the stream between
    the tensor-parallel regions, and between stages, along T), then pipeline stages with
    ``schedule`` over ``microbatches``, then data parallel over the replicas (no ZeRO yet).
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
                 global_batch=global_batch, seq_len=seq_len)  # fmt: skip
    sliced = tensor_parallelize(model, topology, sequence_parallel, seed=seed)
    shards = topology.tp if sequence_parallel else 1  # the stream between stages: T / tp
    pipeline = PipelineParallel(sliced, topology, SCHEDULES[schedule], microbatches,
                                criterion=sliced.loss, sequence_shards=shards)  # fmt: skip
    _drop_other_stages(sliced, pipeline)
    return Hybrid(sliced, pipeline, topology)
