"""Workers for tests/test_hybrid_strategy.py (spawned ranks import them by name).

One spawn at world size 4 runs every 3D job of the test in turn, each on a new Topology:
checkpoints written on one grid, read back on others (round trips, no training), and runs
resumed on another grid or with chapter 3's and 6's strategies.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from course_lib.checkpoint import load_full, save_sharded
from course_lib.data import ByteDataset
from course_lib.launch import DistContext
from course_lib.model import GPTConfig
from course_lib.train import CHECKPOINT_NAME, TrainConfig, make_strategy, train

MODEL = GPTConfig(n_layer=4, n_head=4, n_embd=32, block_size=16)
CONFIG = TrainConfig(steps=6, batch_size=8, seq_len=16, warmup_steps=2, eval_interval=3,
                     eval_batches=1)  # fmt: skip
STOP = 3  # the checkpoints are written after this many steps
# (dp, pp, tp, ZeRO stage, sequence parallel): the grids a 2x2x1 checkpoint is re-cut for
ROUND_TRIPS = [(1, 2, 2, 0, False), (2, 1, 2, 1, True), (1, 1, 4, 0, False),
               (4, 1, 1, 2, False), (2, 2, 1, 1, False), (1, 4, 1, 0, False)]  # fmt: skip


def grid(dp: int, pp: int, tp: int, zero: int = 0, sp: bool = False) -> dict:
    """The hybrid strategy's options for one grid."""
    return dict(dp=dp, pp=pp, tp=tp, zero=zero, sequence_parallel=sp)


def _train(ctx: DistContext, name: str, options: dict, dataset: ByteDataset, out: Path,
           stop_at: int | None = None, resume: bool = False):  # fmt: skip
    """train() one strategy (every rank); its TrainResult and the strategy."""
    cfg = TrainConfig(**{**CONFIG.__dict__, "stop_at": stop_at})
    strategy = make_strategy(name, ctx, **options)
    result = train(MODEL, cfg, dataset, strategy=strategy, out_dir=out, resume=resume,
                   progress=False)  # fmt: skip
    return result, strategy


def _copy(ctx: DistContext, src: Path, dst: Path) -> Path:
    """Rank 0 copies a run folder (its checkpoint) for another run to resume; all wait."""
    if ctx.rank == 0:
        shutil.copytree(src, dst)
    dist.barrier()
    return dst


def _round_trip(ctx: DistContext, src: Path, dst: Path, options: dict) -> None:
    """Load ``src`` onto the grid ``options``, save it again to ``dst`` (no training)."""
    strategy = make_strategy("hybrid", ctx, **options)
    strategy.setup(MODEL, CONFIG, "cpu")
    strategy.load_state_pieces(load_full(src), {})
    pieces, shapes = strategy.state_pieces()
    save_sharded(dst, pieces, shapes, rank=ctx.rank, world_size=ctx.world_size,
                 group=dist.group.WORLD, meta={"grid": options})  # fmt: skip


def _batches(ctx: DistContext, strategy, dataset: ByteDataset) -> list:
    """(dp rank, pp rank, tp rank, the rows this rank draws at step 0) of every rank."""
    t = strategy.topology
    x, _ = strategy.batch(dataset.train, CONFIG, 0)
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, (t.dp_rank, t.pp_rank, t.tp_rank, x))
    return everyone


def every_run(ctx: DistContext, root: Path, dataset: ByteDataset) -> dict | None:
    """Every 3D job of the test at world size 4; rank 0 returns the losses and the batches.

    ``root/single`` holds a single-device checkpoint written (by the test) after STOP steps.
    """
    torch.set_num_threads(1)
    losses, models = {}, {}
    # 1. dp 2 x pp 2 writes a checkpoint after STOP steps
    _, strategy = _train(ctx, "hybrid", grid(2, 2, 1), dataset, root / "a", stop_at=STOP)
    batches = _batches(ctx, strategy, dataset)
    # 2. read back on other grids (ZeRO pieces, tp slices, one stage per block) and rewritten
    for options in ROUND_TRIPS:
        _round_trip(ctx, root / "a" / CHECKPOINT_NAME, root / f"trip{options[:4]}",
                    grid(*options))  # fmt: skip
    # 3. resumed: on 1 x 2 x 2, with chapter 6's tp (tp 4) and chapter 3's zero1 (dp 4)
    resumes = {"1x2x2": ("hybrid", grid(1, 2, 2)), "tp": ("tp", {}), "zero1": ("zero1", {})}
    for name, (strategy_name, options) in resumes.items():
        out = _copy(ctx, root / "a", root / f"resumed-{name}")
        result, _ = _train(ctx, strategy_name, options, dataset, out, resume=True)
        losses[name] = [m["loss"] for m in result.metrics]
        models[name] = result.model.state_dict()
    # 4. dp 2 x tp 2 with ZeRO-1 (and sequence parallelism) writes a checkpoint
    _train(ctx, "hybrid", grid(2, 1, 2, 1, True), dataset, root / "z", stop_at=STOP)
    # 5. a single-device checkpoint resumed on dp 2 x tp 2 with ZeRO-2
    out = _copy(ctx, root / "single", root / "resumed-from-single")
    result, _ = _train(ctx, "hybrid", grid(2, 1, 2, 2), dataset, out, resume=True)
    losses["from-single"] = [m["loss"] for m in result.metrics]
    models["from-single"] = result.model.state_dict()
    return {"losses": losses, "models": models, "batches": batches} if ctx.rank == 0 else None
