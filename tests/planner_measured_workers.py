"""Configurations for tests/test_planner_measured.py.

The spawned ranks run :func:`course_lib.cost.measure_hybrid.measure_worker` (the library's
own worker, which chapter 7's notebook spawns too); this module holds what the test feeds
it: every world-4 configuration of the main model, and a model whose ZeRO groups do not
divide dp = 4, so that the flat buffers' padding is measured.
"""

from course_lib.cost.planner_model import Choice, stage_group_counts
from course_lib.model import GPTConfig

# tied weights; vocabulary 65 is padded to 66 at tp 2 and to 68 at tp 4
CONFIG = GPTConfig(n_layer=4, n_head=4, n_embd=32, block_size=16, vocab_size=65, dropout=0.0)
# d = 18, no biases, 12 positions: both AdamW groups are 2 mod 4 elements, so ZeRO pads them
PADDED = GPTConfig(n_layer=4, n_head=2, n_embd=18, block_size=12, vocab_size=65, dropout=0.0,
                   bias=False)  # fmt: skip
GLOBAL_BATCH, SEQ_LEN = 16, 12


def _choices() -> list[Choice]:
    out = []
    for dp, pp, tp in [(2, 2, 1), (2, 1, 2), (1, 2, 2), (4, 1, 1), (1, 4, 1), (1, 1, 4)]:
        m = 2 * pp if pp > 1 else 2  # 2 micro-batches even without stages: they accumulate
        for zero in (0, 1, 2) if dp > 1 else (0,):
            for sp in (False, True) if tp > 1 else (False,):
                out.append(Choice(dp, pp, tp, m, zero=zero, sequence_parallel=sp))
    return out


JOBS = [(CONFIG, c) for c in _choices()] + [
    (PADDED, Choice(4, 1, 1, 2, zero=1)),
    (PADDED, Choice(4, 1, 1, 2, zero=2)),
]


def padding_is_exercised() -> bool:
    """True when PADDED's two groups really need padding at dp = 4."""
    return all(n % 4 for n in stage_group_counts(PADDED, 1, 1)[0])
