"""Chapter 6's yardstick: torch's DTensor tensor parallelism gives the single device's numbers.

One spawn per world size runs every configuration: loss and every gradient of the first
step, then the parameters after each of three AdamW steps, on every rank, against the
single-device GPT. Tolerances (measured on the 2-core CPU box, torch 2.13):

* losses rel 1e-5 (seen <= 1.7e-7); gradients rtol 1e-5 / atol 1e-6 (largest difference
  seen 1.2e-7; even rtol 1.3e-6 / atol 1e-7 holds, atol 1e-8 alone does not);
* parameters after AdamW steps (lr 1e-2, eps 1e-6): atol 2e-4, 2% of one step (seen
  <= 4.3e-5). Adam divides each gradient by sqrt(v) + eps, which turns fp32 rounding
  noise on near-zero gradient entries (~1e-9 on a ~1e-8 entry) into parameter
  differences of a few 1e-5 for any two summation orders (with eps 1e-8, ~1e-3).
"""

import re

import dtensor_workers as W
import pytest
import torch

from course_lib.launch import run_distributed
from course_lib.model import GPTConfig
from course_lib.parallel.dtensor_tp import (
    check_torch_tp,
    head_permutation,
    torch_tensor_parallelize,
)

CONFIGS = {2: [(True, False), (True, True), (False, False)], 4: [(True, False), (True, True)]}
BAD = W.CONFIG.__dict__
N_HEAD_3 = GPTConfig(**{**BAD, "n_head": 3, "n_embd": 24})
VOCAB_255 = GPTConfig(**{**BAD, "vocab_size": 255})
REFUSALS = [  # (tied, sequence_parallel, config, seq_len) at tp = 2, and the message expected
    ((True, False, N_HEAD_3, 8), r"tp=2 does not divide n_head=3; choose tp in \[1\]"),
    (
        (True, False, VOCAB_255, 8),
        r"tp=2 does not divide vocab_size=255; choose tp in \[1\] or pad",
    ),
    ((True, True, W.CONFIG, 7), "tp=2 to divide the sequence length T=7; use T a multiple of 2"),
    ((True, False, W.CONFIG, 7), "^$"),  # without sequence parallelism any length runs
]


def _compare(run: dict, ref: dict, what: str) -> None:
    assert run["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6), what
    assert run["eval_loss"] == pytest.approx(ref["eval_loss"], rel=1e-5, abs=1e-5), what
    assert set(run["grads"]) == set(ref["grads"]), what  # the tied weight once, as wte.weight
    for name, grad in run["grads"].items():
        torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{what} grad {n}: {m}")  # fmt: skip
    for step, (state, ref_state) in enumerate(zip(run["states"], ref["states"], strict=True)):
        assert set(state) == set(ref_state), what
        for name, p in state.items():
            where = f"{what} step {step} {name}"
            torch.testing.assert_close(p, ref_state[name], rtol=0, atol=2e-4,
                                       msg=lambda m, w=where: f"{w}: {m}")  # fmt: skip


@pytest.mark.timeout(180)
@pytest.mark.parametrize("tp", [2, 4])
def test_dtensor_tp_matches_the_single_device(tp):
    refusals = REFUSALS if tp == 2 else []
    args = [r for r, _ in refusals]
    results = run_distributed(W.dtensor_many, tp, CONFIGS[tp], args, timeout_s=150)
    refs = {tied: W.reference(tied) for tied in {t for t, _ in CONFIGS[tp]}}
    for rank, (runs, messages) in enumerate(results):
        for (tied, sp), run in zip(CONFIGS[tp], runs, strict=True):
            what = f"tp={tp} tied={tied} sp={sp} rank={rank}"
            _compare(run, refs[tied], what)
            assert run["one_tied_parameter"] == tied, what
            assert run["local_heads"] == W.CONFIG.n_head // tp, what
            assert run["local_wte"] == (W.CONFIG.vocab_size // tp, W.CONFIG.n_embd), what
            assert run["local_c_attn"] == (3 * W.CONFIG.n_embd // tp, W.CONFIG.n_embd), what
        for message, (_, pattern) in zip(messages, refusals, strict=True):
            assert re.search(pattern, message), (rank, message)
    for c in range(len(CONFIGS[tp])):  # the loss is one number, the same on every rank
        assert len({tuple(runs[c]["losses"]) for runs, _ in results}) == 1, CONFIGS[tp][c]


def test_a_split_dtensor_cannot_make_is_refused_with_the_fix():
    with pytest.raises(
        ValueError, match=r"tp=3 does not divide n_head=4; choose tp in \[1, 2, 4\]"
    ):
        check_torch_tp(W.CONFIG, 3)
    with pytest.raises(ValueError, match="vocab_size=100; choose tp in \\[1, 2, 4\\] or pad"):
        check_torch_tp(GPTConfig(**{**BAD, "vocab_size": 100, "n_head": 8}), 8)
    with pytest.raises(ValueError, match="T=6; use T a multiple of 4 or sequence_parallel=False"):
        check_torch_tp(W.CONFIG, 4, seq_len=6, sequence_parallel=True)
    check_torch_tp(W.CONFIG, 4, seq_len=6)  # without sequence parallelism T is free
    with pytest.raises(ValueError, match="needs a process group"):
        torch_tensor_parallelize(W.model(True))


def test_head_permutation_gives_each_rank_its_heads():
    d, H, tp = 8, 4, 2
    perm = head_permutation(d, H, tp)
    assert sorted(perm.tolist()) == list(range(3 * d))  # a permutation of the 3d rows
    # rank 1's contiguous half is q, k, v of heads 2 and 3 (head_dim 2): rows 4-7 of each
    assert perm[3 * d // 2 :].tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]
