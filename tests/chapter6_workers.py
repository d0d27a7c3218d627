"""Workers for tests/test_chapter6.py (spawned ranks import them by name).

ONE spawn per world size: :func:`everything` runs every measurement the tests read.
"""

import torch
import torch.distributed as dist

from course_lib.chapters import ch06_tensor as ch6
from course_lib.model import GPTConfig
from course_lib.topology import Topology

# 3 divides neither M = 3 * 5 (without SP) nor the vocabulary 250 (padded): uneven ring
# chunks in the cross-entropy's all-reduce at tp = 4, padding in the embedding and head.
CONFIG = GPTConfig(n_layer=2, n_head=4, n_embd=32, block_size=8, vocab_size=250, dropout=0.0)
PLAIN = dict(batch_size=3, seq=5)  # M = 15 positions: 2M = 30 does not split into 4 chunks
SP = dict(batch_size=2, seq=8)  # sequence parallelism needs tp | T
TIMED = (2, 8)  # batch, seq of measure_worker's run of every variant (vocabulary 256)


def timed_config() -> GPTConfig:
    """CONFIG with a vocabulary DTensor can split (it needs tp | vocab_size)."""
    return GPTConfig(**{**CONFIG.__dict__, "vocab_size": 256})


def everything(ctx, timing: bool) -> dict:
    torch.set_num_threads(1)
    topology = Topology(tp=ctx.world_size)
    sent = {False: ch6.bytes_worker(ctx, CONFIG, **PLAIN, sequence_parallel=(False,),
                                    topology=topology)[False]}  # fmt: skip
    sent |= ch6.bytes_worker(ctx, CONFIG, **SP, sequence_parallel=(True,), topology=topology,
                             recompute_all_gather=True)  # fmt: skip
    plain = ch6.memory_worker(ctx, CONFIG, **PLAIN, sequence_parallel=(False,), topology=topology)
    out = {
        "bytes": sent,
        "memory": {
            "plain": plain[False],
            "sp": ch6.memory_worker(ctx, CONFIG, **SP, topology=topology,
                                    recompute_all_gather=True),
        },
    }
    out["gradients"] = ch6.gradients_worker(ctx, CONFIG, **SP)
    if timing:  # every variant once, on a config DTensor can split (tp | vocabulary)
        config = timed_config()
        variants = list(ch6.VARIANTS)
        out["measure"] = ch6.measure_worker(ctx, config, *TIMED, variants, steps=1, warmup=0,
                                            topology=topology)  # fmt: skip
    dist.barrier()
    return out
