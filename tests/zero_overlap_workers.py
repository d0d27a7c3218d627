"""Worker for tests/test_zero_overlap.py (chapter 3): ZeRO-3 with and without prefetch.

One spawn runs both variants on a 3-block GPT for two steps each; per variant it returns
the bytes each rank held at every block's forward (measured and the formula), the bytes
sent per step, and the second step's timeline.
"""

from __future__ import annotations

import torch

from course_lib import collectives as C
from course_lib.launch import DistContext
from course_lib.model import GPT, GPTConfig
from course_lib.parallel.fsdp import FullyShardedDataParallel, Timeline
from course_lib.parallel.zero import zero3_params_formula
from course_lib.train import train_step

CONFIG = GPTConfig(vocab_size=11, block_size=6, n_layer=3, n_head=2, n_embd=10)


def _padded(unit) -> int:
    return sum(st.layout.padded for st in unit.sharded.values())


def run_variant(ctx: DistContext, prefetch: bool) -> dict:
    torch.manual_seed(0)
    module = GPT(CONFIG)
    counter, timeline = C.CommCounter(), Timeline()
    fsdp = FullyShardedDataParallel(module, counter=counter, prefetch=prefetch, timeline=timeline)
    opt = torch.optim.AdamW(fsdp.parameters(), lr=1e-2)
    numels = [_padded(u) for u in fsdp.units]
    root = _padded(fsdp.root)
    held: list[tuple[int, float]] = []  # (measured, formula) at each block's forward

    def probe(i: int):
        def hook(module, args) -> None:  # registered after FSDP's: the block is gathered
            formula = zero3_params_formula(numels, ctx.world_size, i, prefetch, root)
            held.append((fsdp.memory_bytes(opt)["params"], sum(formula.values())))

        return hook

    for i, block in enumerate(module.blocks):
        block.register_forward_pre_hook(probe(i))
    sent, losses = [], []
    for step in range(2):
        gen = torch.Generator().manual_seed(10 * step + ctx.rank)
        data = torch.randint(0, CONFIG.vocab_size, (4, CONFIG.block_size + 1), generator=gen)
        held.clear()
        counter.reset()
        timeline.reset()
        loss = train_step(fsdp, opt, fsdp, data[:, :-1], data[:, 1:], lr=1e-2, grad_clip=0.0)
        sent.append(counter.bytes_sent)
        losses.append(loss.item())
    between = sum(zero3_params_formula(numels, ctx.world_size, None, prefetch, root).values())
    return {
        "held": list(held),
        "held_between": (fsdp.memory_bytes(opt)["params"], between),
        "sent": sent,
        "losses": losses,
        "events": [(e.unit, e.kind, e.start, e.end) for e in timeline.events],
        "n_blocks": len(fsdp.units),
        "params": torch.cat([p.reshape(-1) for p in fsdp.full_parameters().values()]),
    }


def both_variants(ctx: DistContext) -> dict:
    torch.set_num_threads(1)
    return {prefetch: run_variant(ctx, prefetch) for prefetch in (False, True)}
