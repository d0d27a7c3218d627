"""Rank-side code for tests/test_parameter_server.py: one spawn per world size runs many cases.

A case runs the parameter server step by step (not through train()) so that every rank's
state can be captured after every step: workers return each server's shard of their
model, servers their own shard, both as flat float32 vectors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from course_lib.chapters import ch04_parameter_server as ch4
from course_lib.data import get_batch, load_text, make_dataset
from course_lib.model import GPTConfig
from course_lib.parallel.parameter_server import ParameterServer, PSConfig, flat_of
from course_lib.train import TrainConfig, lr_at, train

MODEL = GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16)
STEPS = 4
TRAIN = TrainConfig(
    steps=STEPS, batch_size=12, seq_len=16, lr=0.3, min_lr=0.1, warmup_steps=0,
    weight_decay=0.0, grad_clip=0.0, eval_interval=2, eval_batches=2,
)  # fmt: skip  # lr changes every step, so a gradient applied with the wrong step's lr shows


def dataset():
    return make_dataset(load_text())


def run_case(ctx, config: PSConfig, steps: int = STEPS, fail_rank: int | None = None) -> dict:
    """Run ``steps`` steps; per step this rank's loss and its shard(s) of the parameters."""
    torch.set_num_threads(1)
    data = dataset().train
    strategy = ParameterServer(ctx, config)
    strategy.setup(MODEL, TRAIN, "cpu")
    losses, shards = [], []
    for step in range(steps):
        if ctx.rank == fail_rank and step == 2:
            raise RuntimeError(f"injected failure on rank {ctx.rank} at step {step}")
        x, y = get_batch(data, TRAIN.batch_size, TRAIN.seq_len, TRAIN.seed, step,
                         strategy.data_rank, strategy.data_world_size)  # fmt: skip
        losses.append(strategy.train_step(x, y, lr_at(step, TRAIN)))
        if strategy.is_server:
            shards.append([strategy.shard.clone()])
        else:
            shards.append([flat_of(s) for s in strategy.shards])
    dist.barrier()  # in async modes a fast worker would push into the next case's rounds
    return {"server": strategy.is_server, "losses": losses, "shards": shards,
            "log": strategy.staleness_log, "bytes_sent": strategy.counter.bytes_sent,
            "bytes_received": strategy.counter.bytes_received}  # fmt: skip


def run_cases(ctx, cases: list[tuple[str, dict]]) -> dict[str, dict]:
    """Every case, one after the other, in one spawn."""
    return {name: run_case(ctx, PSConfig(**kw)) for name, kw in cases}


def run_train(ctx, out_dir: str, mode: str, steps: int, resume_at: int | None = None,
              eval_interval: int = 2) -> dict:  # fmt: skip
    """train() with the parameter server, eval and checkpoints; optionally stop and resume."""
    torch.set_num_threads(1)
    config = TrainConfig(**{**TRAIN.__dict__, "steps": steps, "stop_at": resume_at,
                            "eval_interval": eval_interval})  # fmt: skip
    kw = dict(model_config=MODEL, dataset=dataset(), out_dir=out_dir, progress=False)
    result = train(train_config=config, strategy=ParameterServer(ctx, PSConfig(mode)), **kw)
    if resume_at is not None:
        dist.barrier()  # rank 0 has written the checkpoint that every rank resumes from
        config = TrainConfig(**{**config.__dict__, "stop_at": None})
        strategy = ParameterServer(ctx, PSConfig(mode))
        result = train(train_config=config, strategy=strategy, resume=True, **kw)
    if ctx.rank != 0:
        return {}
    params = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    return {"metrics": result.metrics, "params": params}


def run_world(ctx, cases: list[tuple[str, dict]], out_dir: str) -> dict:
    """Every case of this world size, (world 3) train() runs through the loop and (world 4)
    chapter 4's byte counters: 1 server + 3 workers, and a ring all-reduce among them."""
    results = {"cases": run_cases(ctx, cases)}
    if ctx.world_size == 4:
        results["bytes"] = ch4.bytes_worker(ctx, MODEL, TRAIN, dataset(), steps=2)
    if ctx.world_size == 3:
        results["resumed"] = run_train(ctx, f"{out_dir}/sync", "sync", STEPS, resume_at=2)
        results["async"] = run_train(ctx, f"{out_dir}/async", "async", 24, eval_interval=8)
    return results
