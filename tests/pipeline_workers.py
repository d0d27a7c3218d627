"""Workers for tests/test_pipeline.py (spawned ranks import them by name)."""

import torch

from course_lib.model import GPT, GPTConfig
from course_lib.parallel import schedules as S
from course_lib.parallel.pipeline import PipelineParallel
from course_lib.topology import Topology

CONFIG = GPTConfig(n_layer=8, n_head=2, n_embd=16, block_size=8, dropout=0.0)
SCHEDULES = {"gpipe": S.gpipe, "1f1b": S.one_f_one_b, "interleaved": S.interleaved_1f1b,
             "zb": S.zero_bubble_h1}  # fmt: skip


def batch(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, CONFIG.vocab_size, (n, CONFIG.block_size + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def model(config: GPTConfig = CONFIG) -> GPT:
    torch.manual_seed(0)
    return GPT(config)


def pipeline_grads(ctx, schedule: str, microbatches: int, chunks: int, n: int, tied: bool):
    """One pipeline step; this rank's loss and gradients by full-model name."""
    torch.set_num_threads(1)
    cfg = GPTConfig(**{**CONFIG.__dict__, "tie_weights": tied})
    pp = PipelineParallel(model(cfg), Topology(pp=ctx.world_size), SCHEDULES[schedule],
                          microbatches, chunks)  # fmt: skip
    loss = pp.run(*batch(n))
    return loss, {name: p.grad.clone() for name, p in pp.named_parameters()}


def torch_pipelining_grads(ctx, schedule: str, microbatches: int, chunks: int, n: int):
    """The same stages under torch.distributed.pipelining; loss and gradients by name."""
    from torch.distributed import pipelining as tp

    from course_lib.model import loss_fn
    from course_lib.parallel.pipeline import Stage, split_blocks

    torch.set_num_threads(1)
    cfg = GPTConfig(**{**CONFIG.__dict__, "tie_weights": False})
    full, p = model(cfg), ctx.world_size
    ranges, last = split_blocks(cfg.n_layer, p * chunks), p * chunks - 1
    mine = [ctx.rank + c * p for c in range(chunks)]
    modules = [Stage(full, ranges[v], v == 0, v == last) for v in mine]
    cpu = torch.device("cpu")
    stages = [tp.PipelineStage(s, v, p * chunks, cpu) for s, v in zip(modules, mine, strict=True)]
    kind = {"gpipe": tp.ScheduleGPipe, "1f1b": tp.Schedule1F1B,
            "interleaved": tp.ScheduleInterleaved1F1B}[schedule]  # fmt: skip
    sched = kind(stages if chunks > 1 else stages[0], microbatches, loss_fn=loss_fn)
    x, y = batch(n)
    losses: list[torch.Tensor] = []
    args = (x,) if 0 in mine else ()
    kwargs = {"target": y, "losses": losses} if last in mine else {}
    sched.step(*args, **kwargs)
    loss = float(torch.stack(losses).detach().mean()) if losses else None
    grads = {n: p.grad.clone() for m in modules for n, p in m.named_parameters()}
    return loss, grads


def pipeline_grads_many(ctx, configs: list[tuple[str, int, int]], n: int, tied: bool):
    """Each (schedule, m, chunks) in one spawn: the loss and this rank's gradients."""
    return [pipeline_grads(ctx, schedule, m, v, n, tied) for schedule, m, v in configs]
