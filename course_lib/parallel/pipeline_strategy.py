"""Chapter 5: pipeline parallelism as a training-loop strategy (``--strategy pp``).

:class:`PipelineSync` gives :class:`~course_lib.parallel.pipeline.PipelineParallel` the
rest of the course's gradient-sync interface (``course_lib.train.GradientSync``): clipping
by the global norm over the stages, the full state dict gathered from the stages, and
checkpoint pieces named as in the plain GPT, so a pipeline checkpoint resumes on one device
or with data parallelism, and back. :class:`PipelineStrategy` plugs both into
``course_lib.train.train``: every rank of the pipeline draws the whole batch, runs the
schedule, steps the optimizer over its own stages' parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from course_lib.checkpoint import Pieces, Shapes, whole_piece
from course_lib.launch import DistContext
from course_lib.memory import replicated_memory
from course_lib.model import GPT, loss_fn
from course_lib.parallel import schedules as S
from course_lib.parallel.common import clip_grad_norm_, gather_object
from course_lib.parallel.pipeline import PipelineParallel, split_blocks
from course_lib.topology import Topology
from course_lib.train import Strategy, TrainConfig, adamw_settings, optimizer_groups, set_lr

SCHEDULES = {"gpipe": S.gpipe, "1f1b": S.one_f_one_b, "interleaved": S.interleaved_1f1b,
             "zb": S.zero_bubble_h1}  # fmt: skip


def check_pipeline(
    stages: int, n_layer: int, batch_size: int, schedule: str, microbatches: int, chunks: int
) -> None:
    """Chapter 5: refuse a pipeline that cannot run, with the fix, before any rank starts."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {sorted(SCHEDULES)}")
    if chunks > 1 and schedule != "interleaved":
        raise ValueError(f"{chunks} chunks per rank need the interleaved schedule")
    if batch_size % microbatches:
        raise ValueError(
            f"a batch of {batch_size} sequences does not split into {microbatches} equal "
            f"micro-batches; use a batch size divisible by {microbatches}"
        )
    args = (stages, microbatches, chunks) if schedule == "interleaved" else (stages, microbatches)
    SCHEDULES[schedule](*args)  # raises on too few micro-batches, m not a multiple of p, ...
    split_blocks(n_layer, stages * chunks)  # raises on more stages than blocks


class PipelineSync:
    """Chapter 5: the GradientSync of a pipeline: each rank holds whole tensors of its stages.

    The tied embedding/head matrix (held by the first and the last stage) is named
    ``wte.weight`` as in the plain GPT and counted once: the first stage owns it.
    """

    def __init__(self, pipeline: PipelineParallel, model: GPT) -> None:
        self.pipeline, self.group = pipeline, pipeline.group
        self.stages = nn.ModuleList(pipeline.stages)
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        tied = model.config.tie_weights
        self.canonical = {
            n: ("wte.weight" if tied and n == "lm_head.weight" else n)
            for n, _ in pipeline.named_parameters()
        }
        self.owned = {n for n in self.canonical if not (tied and n == "lm_head.weight")}

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        yield  # the schedule accumulates over its micro-batches by itself

    def finish_gradient_synchronization(self) -> None:
        pass  # run() already summed the tied matrix's two halves

    def parameters(self) -> Iterator[nn.Parameter]:
        return iter(self.pipeline.parameters())

    def clip_grad_norm_(self, max_norm: float) -> float:
        """The global norm: each parameter counted once over the stages (one all-reduce)."""
        named = self.pipeline.named_parameters()
        owned = [p for n, p in named if n in self.owned]
        total = clip_grad_norm_(owned, 1e30, self.group)  # the norm only: scale 1
        scale = min(1.0, max_norm / (total + 1e-6))
        for _, p in named:
            if p.grad is not None:
                p.grad.mul_(scale)
        return total

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's tensors, whole, under the plain GPT's names (a collective)."""
        mine = {k: v.detach().cpu().clone() for k, v in self._own_state().items()}
        merged: dict[str, torch.Tensor] = {}
        for part in gather_object(mine, self.group):
            merged.update(part)
        return merged

    def _own_state(self) -> dict[str, torch.Tensor]:
        """This rank's stages' tensors under the plain GPT's names (no stage prefix)."""
        return {k: v for stage in self.stages for k, v in stage.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for stage in self.stages:
            stage.load_state_dict({k: state[k] for k in stage.state_dict()})

    def memory_bytes(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        return replicated_memory(self.stages, optimizer)

    def state_pieces(self, optimizer: torch.optim.Optimizer) -> tuple[Pieces, Shapes]:
        """Whole pieces of this rank's parameters and their optimizer state."""
        pieces: Pieces = {}
        keys: set[tuple[str, tuple[int, ...]]] = set()
        for name, p in self.pipeline.named_parameters():
            state = {k: v for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)}
            keys |= {(k, tuple(v.shape) if v.dim() else ()) for k, v in state.items()}
            if name not in self.owned:
                continue
            canon = self.canonical[name]
            pieces[f"model/{canon}"] = [whole_piece(p.detach())]
            for key, value in state.items():
                pieces[f"optimizer/{canon}/{key}"] = [whole_piece(value)]
        shapes: Shapes = {f"model/{n}": s for n, s in self.shapes.items()}
        for key, shape in keys:  # exp_avg, exp_avg_sq (a parameter's shape) and step (0-d)
            for n, s in self.shapes.items():
                shapes[f"optimizer/{n}/{key}"] = s if shape else ()
        return pieces, shapes

    @torch.no_grad()
    def load_state_pieces(
        self, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
    ) -> None:
        for name, p in self.pipeline.named_parameters():
            canon = self.canonical[name]
            p.copy_(tensors[f"model/{canon}"])
            prefix = f"optimizer/{canon}/"
            state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if state:
                optimizer.state[p] = {k: v.clone() for k, v in state.items()}


class PipelineStrategy(Strategy):
    """Chapter 5: ``--strategy pp``: the GPT cut into ``world_size`` stages, one schedule."""

    name = "pp"

    def __init__(
        self,
        ctx: DistContext | None = None,
        schedule: str = "1f1b",
        microbatches: int | None = None,
        chunks: int = 1,
    ) -> None:
        super().__init__(ctx)
        self.schedule, self.microbatches = schedule, microbatches
        self.chunks = max(chunks, 2) if schedule == "interleaved" else chunks

    def options(self, stages: int) -> tuple[int, int]:
        """(micro-batches, chunks): by default two micro-batches per stage."""
        return self.microbatches or 2 * stages, self.chunks

    def make_topology(self) -> Topology:
        return Topology(pp=self.ctx.world_size if self.ctx is not None else 1)

    def wrap(self, module: GPT, cfg: TrainConfig):
        m, chunks = self.options(self.topology.pp)
        check_pipeline(self.topology.pp, module.config.n_layer, cfg.batch_size, self.schedule,
                       m, chunks)  # fmt: skip
        pipeline = PipelineParallel(module, self.topology, SCHEDULES[self.schedule], m, chunks)
        optimizer = torch.optim.AdamW(optimizer_groups(pipeline.parameters(), cfg),
                                      **adamw_settings(cfg))  # fmt: skip
        return pipeline, optimizer, PipelineSync(pipeline, module)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        set_lr(self.optimizer, lr)
        for stage in self.model.stages:
            stage.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.model.run(x, y)
        if self.train_config.grad_clip > 0:
            self.sync.clip_grad_norm_(self.train_config.grad_clip)
        self.optimizer.step()
        return loss

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        for stage in self.model.stages:
            stage.eval()
        return self.model.evaluate(x, y, loss_fn)

    def full_model(self) -> GPT:
        state = self.sync.full_state_dict()
        model = GPT(self.model_config).to(self.device)
        model.load_state_dict(state)
        return model


def pipeline_strategy(ctx: DistContext | None = None, **options: Any) -> PipelineStrategy:
    """``make_strategy("pp", ctx, schedule=..., microbatches=..., chunks=...)``."""
    return PipelineStrategy(ctx, **options)
