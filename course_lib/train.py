"""The strategy-agnostic training loop: metrics, checkpoints, progress bar (chapter 0).

Every chapter trains the same way: each process draws its slice of the step's global
batch, a :class:`Strategy` runs the step, the main process logs, evaluates and saves.
Chapter 0 runs the single-device reference :class:`SingleDevice`; later chapters plug in
data parallel, ZeRO, pipeline and tensor parallel as subclasses and must reproduce its
losses.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from course_lib.checkpoint import (
    Pieces,
    Shapes,
    atomic_write,
    check_names,
    load_full,
    load_manifest,
    load_replicated,
    replicated_pieces,
    save_sharded,
)
from course_lib.data import ByteDataset, batch_for, check_batch_shape
from course_lib.memory import replicated_memory
from course_lib.model import GPT, GPTConfig, loss_fn
from course_lib.parallel.common import global_mean
from course_lib.topology import Topology

if TYPE_CHECKING:
    from course_lib.launch import DistContext


CHECKPOINT_NAME = "checkpoint"  # a folder: one file per rank + manifest.json
METRICS_NAME = "metrics.json"
# Fields that may change between a run and its resumption: they do not alter the maths.
RESUMABLE_CHANGES = ("stop_at", "checkpoint_interval", "eval_interval", "eval_batches")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass
class TrainConfig:
    """One training run's hyperparameters (chapter 0). Defaults: the CLI's tuned tiny run."""

    steps: int = 800  # planned optimizer steps; the lr schedule spans all of them
    batch_size: int = 32  # GLOBAL batch in sequences, split evenly across data ranks
    seq_len: int = 64  # tokens per sequence; at most the model's block_size
    lr: float = 3e-3  # peak learning rate, reached at the end of the warmup
    min_lr: float = 3e-4  # learning rate at the last step, where the cosine ends
    warmup_steps: int = 50  # steps of linear warmup, then cosine decay (none if >= steps)
    weight_decay: float = 0.1  # AdamW decoupled weight decay, on 2-D weights only
    beta1: float = 0.9  # AdamW decay rate of the first moment (momentum)
    beta2: float = 0.99  # AdamW decay rate of the second moment
    grad_clip: float = 1.0  # largest global gradient norm; 0 turns clipping off
    eval_interval: int = 100  # evaluate after every this many steps and after the last
    eval_batches: int = 8  # validation batches averaged per evaluation
    seed: int = 1337  # seeds the model init, dropout and the sequence of batches
    checkpoint_interval: int = 0  # save every this many steps; 0 = only when the run stops
    stop_at: int | None = None  # stop (and save) after this many steps; None = run all steps

    def __post_init__(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "eval_interval", "eval_batches")
        checks = [(getattr(self, k) >= 1, f"{k}={getattr(self, k)} must be >= 1") for k in positive]
        checks += [
            (self.lr > 0, f"lr={self.lr} must be > 0"),
            (0 <= self.min_lr <= self.lr, f"min_lr={self.min_lr} must be in [0, lr={self.lr}]"),
            (self.warmup_steps >= 0, f"warmup_steps={self.warmup_steps} must be >= 0"),
            (self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0"),
            (0 <= self.beta1 < 1, f"beta1={self.beta1} must be in [0, 1), e.g. 0.9"),
            (0 <= self.beta2 < 1, f"beta2={self.beta2} must be in [0, 1), e.g. 0.99"),
            (self.grad_clip >= 0, f"grad_clip={self.grad_clip} must be >= 0 (0 = no clipping)"),
            (self.checkpoint_interval >= 0,
             f"checkpoint_interval={self.checkpoint_interval} must be >= 0 (0 = at the end)"),
            (self.stop_at is None or 1 <= self.stop_at <= self.steps,
             f"stop_at={self.stop_at} must be None or in [1, steps={self.steps}]"),
        ]  # fmt: skip
        for ok, message in checks:
            _require(ok, f"TrainConfig: {message}")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at ``step``: linear warmup to ``lr``, cosine decay to ``min_lr``.

    Chapter 0. A pure function of the step and the PLANNED ``cfg.steps``, so a run
    stopped early and resumed follows the same schedule as one that never stopped.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - 1 - cfg.warmup_steps)
    ratio = min(1.0, (step - cfg.warmup_steps) / decay_steps)  # 0 -> 1 over the decay
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - cfg.min_lr)


def build_model(model_config: GPTConfig, seed: int, device: torch.device | str) -> GPT:
    """The GPT every process starts from (chapter 0): seeded, built on the CPU, then moved.

    Built under ``torch.random.fork_rng`` seeded with ``seed``: bitwise the same weights on
    every rank and every device type, and the caller's random state is left untouched (the
    training loop seeds dropout itself, see :func:`seed_everything`).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT(model_config)
    return model.to(device)


def seed_everything(seed: int) -> None:
    """Seed torch's, Python's and numpy's global generators (chapter 0): dropout's masks."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def optimizer_groups(params: list[torch.nn.Parameter], cfg: TrainConfig) -> list[dict]:
    """AdamW's two parameter groups (chapter 0): decay the 2-D weights, not the rest.

    Biases and LayerNorm parameters are not decayed; frozen parameters are left out.
    """
    params = [p for p in params if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def adamw_settings(cfg: TrainConfig) -> dict[str, Any]:
    """AdamW's keyword arguments for ``cfg`` (chapter 0): learning rate and betas."""
    return {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2)}


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on the 2-D weights only, as nanoGPT does (chapter 0)."""
    return torch.optim.AdamW(optimizer_groups(list(model.parameters()), cfg), **adamw_settings(cfg))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group (chapter 0)."""
    for group in optimizer.param_groups:
        group["lr"] = lr


# ---------------------------------------------------------------------------------------
# One interface for how gradients are combined, one train step for every strategy
# ---------------------------------------------------------------------------------------


class GradientSync(Protocol):
    """What every data-parallel strategy does to gradients (chapters 0, 2 and 3).

    Implemented by :class:`LocalGradients` (one device), ``DataParallel`` (chapter 2),
    ``ZeroRedundancyOptimizer`` stages 1-2 and ``FullyShardedDataParallel`` (chapter 3),
    so that :func:`train_step` and the checkpoints run every one of them the same way.
    """

    def no_sync(self) -> AbstractContextManager[None]:
        """Backward passes inside only accumulate; the next synced one combines them all."""

    def finish_gradient_synchronization(self) -> None:
        """After backward: leave this rank with the gradients the optimizer must apply."""

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The parameters the optimizer steps (FSDP: this rank's flat shards)."""

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the GLOBAL gradient by its norm (over every shard, once); return the norm."""

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, whole, by its name in the plain model (a collective)."""

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Each rank takes what it holds out of a full state dict (no communication)."""

    def memory_bytes(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """Bytes this rank holds for parameters, gradients and optimizer state."""

    def state_pieces(self, optimizer: torch.optim.Optimizer) -> tuple[Pieces, Shapes]:
        """This rank's pieces of the model and optimizer state, for a sharded checkpoint."""

    def load_state_pieces(
        self, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
    ) -> None:
        """Take this rank's part of whole checkpoint tensors (any world size wrote them)."""


class WholeModelSync:
    """Chapters 0 and 2: the GradientSync methods of a model every rank holds whole.

    Mixed into :class:`LocalGradients` and chapter 2's ``DataParallel``; the class sets
    ``self.module`` and says, in :meth:`writes_checkpoint`, whether this rank writes the
    (replicated) checkpoint.
    """

    module: torch.nn.Module

    def writes_checkpoint(self) -> bool:
        return True

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        return self.module.parameters(recurse)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Every rank holds the whole gradient: torch's clipping, no communication."""
        return torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm).item()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def memory_bytes(self, optimizer: torch.optim.Optimizer) -> dict[str, int]:
        """The baseline of chapter 3: a whole model, gradient and optimizer state."""
        return replicated_memory(self.module, optimizer)

    def state_pieces(self, optimizer: torch.optim.Optimizer) -> tuple[Pieces, Shapes]:
        return replicated_pieces(self.module, optimizer, write=self.writes_checkpoint())

    def load_state_pieces(
        self, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer
    ) -> None:
        load_replicated(self.module, optimizer, tensors)


class LocalGradients(WholeModelSync):
    """Chapter 0: the :class:`GradientSync` of one device: nothing to combine."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        yield

    def finish_gradient_synchronization(self) -> None:
        pass


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    sync: GradientSync,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    grad_clip: float,
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = loss_fn,
) -> torch.Tensor:
    """One optimizer step on this rank's slice ``(x, y)``; every strategy runs this (chapter 0).

    The recipe of every chapter: forward, backward, combine the gradients as the strategy
    does (``sync``), clip by the global norm, step. Returns this rank's loss (a tensor).
    ``criterion(model(x), y)`` is the loss: :func:`~course_lib.model.loss_fn`, or chapter 6's
    vocabulary-parallel cross-entropy for a model whose output is a slice of the logits.
    """
    set_lr(optimizer, lr)
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = criterion(model(x), y)
    loss.backward()
    sync.finish_gradient_synchronization()
    if grad_clip > 0:
        sync.clip_grad_norm_(grad_clip)
    optimizer.step()
    return loss


class Strategy:
    """How one training step runs: the plug-in point of the course (chapter 0).

    A strategy owns the model, the optimizer and the :class:`GradientSync` that combines
    gradients over its :class:`~course_lib.topology.Topology`. :func:`train` calls, on
    every process: ``setup`` once; per step :func:`~course_lib.data.batch_for` (this data
    rank's slice of the global batch) then ``train_step(x, y, lr)``, which returns the
    GLOBAL batch's loss, the same on every rank; ``eval_loss`` likewise without an update;
    ``state_pieces``/``load_state_pieces`` for sharded checkpoints (collectives); and
    ``full_model`` at the end (the plain GPT, gathered if split). A data-parallel strategy
    only overrides :meth:`wrap`; the parameter server (chapter 4) overrides the step too.
    Only the process with ``is_main`` writes files and shows progress.
    """

    name = "base"
    needs_process_group = True  # every strategy but the single-device reference

    def __init__(self, ctx: DistContext | None = None) -> None:
        self.ctx = ctx  # this process's place in the launch; None for a plain single process
        self.device = torch.device("cpu")  # where the model lives; set by setup()
        self.topology: Topology | None = None  # the grid of ranks; built by setup()
        self.model: torch.nn.Module | None = None  # the model as this process calls it
        self.optimizer: torch.optim.Optimizer | None = None  # built by setup()
        self.sync: GradientSync | None = None  # how gradients are combined; built by setup()
        self.train_config: TrainConfig | None = None  # set by setup()
        self.model_config: GPTConfig | None = None  # set by setup()

    @property
    def data_rank(self) -> int:  # which slice of the global batch this process draws
        return self.topology.dp_rank if self.topology is not None else 0

    @property
    def data_world_size(self) -> int:  # into how many slices the global batch is cut
        if self.topology is not None:
            return self.topology.dp
        return self.ctx.world_size if self.ctx is not None else 1

    @property
    def is_main(self) -> bool:  # the one process that logs and writes files
        return self.ctx is None or self.ctx.rank == 0

    def default_device(self) -> torch.device:  # used when train() is given no device
        return torch.device(self.ctx.device if self.ctx is not None else "cpu")

    def batch(self, data: torch.Tensor, cfg: TrainConfig, step: int) -> tuple:
        """This rank's slice of the global batch at ``step``: a function of the topology."""
        return batch_for(data, cfg.batch_size, cfg.seq_len, cfg.seed, step, self.topology,
                         self.device)  # fmt: skip

    def make_topology(self) -> Topology:
        """The grid this strategy runs on; data parallel over every rank unless overridden."""
        return Topology(dp=self.ctx.world_size if self.ctx is not None else 1)

    def wrap(
        self, module: GPT, cfg: TrainConfig
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, GradientSync]:
        """(model to call, optimizer, gradient sync) around a freshly built ``module``."""
        raise NotImplementedError

    def setup(self, model_config: GPTConfig, train_config: TrainConfig, device: Any) -> None:
        if self.needs_process_group and not dist.is_initialized():
            raise RuntimeError(
                f"strategy {self.name!r} needs a process group: launch it with "
                "run_distributed, torchrun or --world-size N"
            )
        self.device, self.train_config = torch.device(device), train_config
        self.model_config = model_config
        self.topology = self.make_topology()
        module = build_model(model_config, train_config.seed, self.device)
        self.model, self.optimizer, self.sync = self.wrap(module, train_config)

    def mean_loss(self, loss: torch.Tensor) -> float:
        """The global batch's loss from this data rank's: the mean over the data ranks."""
        if self.topology.dp == 1:
            return loss.item()
        return global_mean(loss, self.topology.dp_group)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
        cfg = self.train_config
        loss = train_step(self.model, self.optimizer, self.sync, x, y, lr, cfg.grad_clip)
        return self.mean_loss(loss)

    @torch.no_grad()
    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        return self.mean_loss(loss_fn(self.model(x), y))

    def state_pieces(self) -> tuple[Pieces, Shapes]:
        return self.sync.state_pieces(self.optimizer)

    def load_state_pieces(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.sync.load_state_pieces(tensors, self.optimizer)

    def full_model(self) -> GPT:
        model = build_model(self.model_config, 0, self.device)  # weights replaced below
        model.load_state_dict(self.sync.full_state_dict())
        return model


class SingleDevice(Strategy):
    """The reference strategy (chapter 0): the whole model and batch on one device."""

    name = "single"
    needs_process_group = False

    def __init__(self, ctx: DistContext | None = None) -> None:
        if ctx is not None and ctx.world_size != 1:
            raise ValueError(
                f"strategy 'single' runs one process, got world_size={ctx.world_size}; "
                "use a data-parallel strategy (chapter 2) for more"
            )
        super().__init__(ctx)

    def make_topology(self) -> Topology:
        return Topology.single()  # never communicates, even run inside a launched world

    def wrap(self, module: GPT, cfg: TrainConfig):
        return module, make_optimizer(module, cfg), LocalGradients(module)

    def full_model(self) -> GPT:
        return self.model


# Every strategy by its CLI name, as "module:factory"; a factory takes the DistContext
# (or None) and returns a Strategy. Imported on use, so chapter 0 needs none of the others.
STRATEGIES: dict[str, str] = {
    "single": "course_lib.train:SingleDevice",
    "dp": "course_lib.parallel.data_parallel:DataParallelStrategy",  # chapter 2, overlapped buckets
    "zero1": "course_lib.parallel.zero:Zero1Strategy",  # chapter 3: optimizer state sharded
    "zero2": "course_lib.parallel.zero:Zero2Strategy",  # chapter 3: + gradients sharded
    "zero3": "course_lib.parallel.fsdp:Zero3Strategy",  # chapter 3: + parameters sharded (FSDP)
    "ps-sync": "course_lib.parallel.parameter_server:ps_sync",  # chapter 4: synchronous server
    "ps-async": "course_lib.parallel.parameter_server:ps_async",  # chapter 4: asynchronous
    "ps-ssp": "course_lib.parallel.parameter_server:ps_ssp",  # chapter 4: bounded staleness
    "pp": "course_lib.parallel.pipeline_strategy:pipeline_strategy",  # chapter 5: pipeline
    "tp": "course_lib.parallel.tensor_strategy:tensor_strategy",  # chapter 6: tensor parallel
    "hybrid": "course_lib.parallel.hybrid_strategy:hybrid_strategy",  # chapter 7: dp x pp x tp
}


def make_strategy(name: str, ctx: DistContext | None = None, **options: Any) -> Strategy:
    """The strategy registered as ``name`` in :data:`STRATEGIES`, built for ``ctx``.

    ``options`` go to the strategy's factory (chapter 5's pipeline: ``schedule``,
    ``microbatches``, ``chunks``); the other strategies take none.
    """
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    module_name, factory = STRATEGIES[name].split(":")
    return getattr(importlib.import_module(module_name), factory)(ctx, **options)


@dataclass
class TrainResult:
    """What :func:`train` returns (chapter 0)."""

    metrics: list[dict[str, Any]]  # per step: step, loss, lr, step_time_s, tokens_per_s, val_loss
    model: GPT  # the trained model as one plain GPT module
    metrics_path: Path | None  # the metrics JSON, or None when train() had no out_dir

    @property
    def final_val_loss(self) -> float | None:
        """The last validation loss (nats per token): that of the final model."""
        vals = [m["val_loss"] for m in self.metrics if m["val_loss"] is not None]
        return vals[-1] if vals else None


def rng_state(device: torch.device) -> dict[str, Any]:
    """Every random number generator training touches, as plain data (chapter 0)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state().tolist(), "python": random.getstate()}
    state["numpy"] = [kind, key.tolist(), pos, has_gauss, gauss]
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device).tolist()
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Inverse of :func:`rng_state`: resumed dropout masks equal the uninterrupted run's."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8), device)


def validate_run(
    model_config: GPTConfig, cfg: TrainConfig, dataset: ByteDataset, data_world_size: int = 1
) -> None:
    """Raise ValueError, naming the numbers and the fix, before any work or communication."""
    _require(
        cfg.seq_len <= model_config.block_size,
        f"seq_len={cfg.seq_len} exceeds the model's block_size={model_config.block_size}; "
        f"use seq_len <= {model_config.block_size} or a larger block_size",
    )
    check_batch_shape(len(dataset.train), cfg.batch_size, cfg.seq_len, data_world_size)
    check_batch_shape(len(dataset.val), cfg.batch_size, cfg.seq_len, data_world_size)


def is_eval_step(step: int, cfg: TrainConfig) -> bool:
    """Evaluate after every ``eval_interval`` steps and after the last planned step."""
    return (step + 1) % cfg.eval_interval == 0 or step == cfg.steps - 1


def evaluate(strategy: Strategy, dataset: ByteDataset, cfg: TrainConfig) -> float:
    """Mean validation loss over ``cfg.eval_batches`` fixed batches (chapter 0)."""
    batches = (strategy.batch(dataset.val, cfg, i) for i in range(cfg.eval_batches))
    losses = [strategy.eval_loss(x, y) for x, y in batches]
    return sum(losses) / len(losses)


@dataclass
class _Run:
    """One call of :func:`train`: what the loop's helpers share."""

    strategy: Strategy  # runs the steps
    model_config: GPTConfig  # shape of the model
    cfg: TrainConfig  # the run's hyperparameters
    dataset: ByteDataset  # train and val token ids
    out: Path | None  # where metrics.json and checkpoint/ go; None = nowhere

    def header(self) -> dict[str, Any]:
        """The configs, as saved with the metrics and in the checkpoint."""
        return {"model_config": asdict(self.model_config), "train_config": asdict(self.cfg)}


def _world() -> tuple[int, int, Any]:
    """(global rank, world size, world group) of this launch; (0, 1, None) for one process."""
    if not dist.is_initialized():
        return 0, 1, None
    return dist.get_rank(), dist.get_world_size(), dist.group.WORLD


def _load_checkpoint(run: _Run) -> tuple[int, list[dict[str, Any]]]:
    """Restore model, optimizer and RNGs from ``run.out``; return (next step, metrics).

    The checkpoint may come from another world size or strategy: each rank re-slices the
    whole tensors it needs (:mod:`course_lib.checkpoint`).
    """
    path = run.out / CHECKPOINT_NAME
    manifest = load_manifest(path)
    meta = manifest["meta"]
    wanted = {**run.header()["model_config"], **run.header()["train_config"]}
    saved = {**meta["model_config"], **meta["train_config"]}
    diff = [k for k in wanted if k not in RESUMABLE_CHANGES and wanted[k] != saved.get(k)]
    changes = ", ".join(f"{k}={saved.get(k)} (now {wanted[k]})" for k in diff)
    _require(not diff, f"cannot resume: the checkpoint has {changes}; resume with the same "
             "settings or start a new run without resume")  # fmt: skip
    _, shapes = run.strategy.state_pieces()
    models = {n: e for n, e in manifest["tensors"].items() if n.startswith("model/")}
    check_names(
        {**manifest, "tensors": models}, {n: s for n, s in shapes.items() if n.startswith("model/")}
    )
    run.strategy.load_state_pieces(load_full(path), meta)
    restore_rng(meta["rng"], run.strategy.device)
    return meta["step"], meta["metrics"]


def _save_outputs(run: _Run, stop: int, metrics: list[dict[str, Any]]) -> None:
    """After each step: a checkpoint when one is due; metrics.json after evals and at the end."""
    done, interval = metrics[-1]["step"] + 1, run.cfg.checkpoint_interval
    main = run.strategy.is_main
    if done == stop or (interval > 0 and done % interval == 0):
        pieces, shapes = run.strategy.state_pieces()
        meta = {**run.header(), "strategy": run.strategy.name, "step": done, "metrics": metrics}
        topology = run.strategy.topology
        meta["topology"] = topology.describe() if topology is not None else None
        meta["rng"] = rng_state(run.strategy.device)
        rank, world, group = _world()
        save_sharded(run.out / CHECKPOINT_NAME, pieces, shapes, rank=rank, world_size=world,
                     group=group, meta=meta)  # fmt: skip
    if main and (done == stop or metrics[-1]["val_loss"] is not None):
        doc = {"strategy": run.strategy.name, **run.header(), "metrics": metrics}
        atomic_write(run.out / METRICS_NAME, lambda f: f.write(json.dumps(doc).encode()))


def _run_step(run: _Run, step: int) -> dict[str, Any]:
    """One training step, timed, and an evaluation after it when one is due."""
    cfg, start, lr = run.cfg, time.perf_counter(), lr_at(step, run.cfg)
    loss = run.strategy.train_step(*run.strategy.batch(run.dataset.train, cfg, step), lr)
    dt = time.perf_counter() - start
    tokens_per_s = cfg.batch_size * cfg.seq_len / dt
    row = dict(step=step, loss=loss, lr=lr, step_time_s=dt, tokens_per_s=tokens_per_s)
    row["val_loss"] = evaluate(run.strategy, run.dataset, cfg) if is_eval_step(step, cfg) else None
    return row


def train(
    model_config: GPTConfig,
    train_config: TrainConfig,
    dataset: ByteDataset,
    strategy: Strategy | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    device: torch.device | str | None = None,
) -> TrainResult:
    """Train ``GPT(model_config)`` on ``dataset`` with ``strategy`` (chapter 0).

    Every process of a launch calls it. Row ``s`` of the metrics holds the training loss
    of step ``s`` and, at eval steps, the validation loss after its update. With
    ``out_dir``, writes metrics.json and the checkpoint/ folder there; ``resume`` continues from it.
    """
    strategy = strategy if strategy is not None else SingleDevice()
    validate_run(model_config, train_config, dataset, strategy.data_world_size)
    if resume and out_dir is None:
        raise ValueError("resume=True needs the out_dir that holds the checkpoint")
    out = Path(out_dir) if out_dir is not None else None
    run = _Run(strategy, model_config, train_config, dataset, out)
    seed_everything(train_config.seed)  # dropout's masks; the weights come from build_model
    strategy.setup(model_config, train_config, device or strategy.default_device())
    start, metrics = _load_checkpoint(run) if resume else (0, [])
    stop = train_config.stop_at or train_config.steps
    show = progress and strategy.is_main
    bar = tqdm(range(start, stop), initial=start, total=stop, disable=not show, unit="step")
    for step in bar:
        row = _run_step(run, step)
        metrics.append(row)
        bar.set_postfix(
            loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", refresh=False
        )
        if out is not None:
            _save_outputs(run, stop, metrics)
    bar.close()
    metrics_path = out / METRICS_NAME if out is not None else None
    return TrainResult(metrics=metrics, model=strategy.full_model(), metrics_path=metrics_path)


def train_worker(
    ctx: DistContext,
    strategy_name: str,
    strategy_options: dict[str, Any] | None = None,
    **train_kwargs: Any,
) -> TrainResult | None:
    """One rank of a launched run (chapter 2 on): ``train(strategy=<named strategy>, ...)``.

    Lives in an importable module so that spawned ranks can unpickle it. ``train_kwargs``
    are :func:`train`'s arguments. Returns the result on the main rank, None elsewhere.
    """
    strategy = make_strategy(strategy_name, ctx, **(strategy_options or {}))
    result = train(strategy=strategy, **train_kwargs)
    return result if strategy.is_main else None
