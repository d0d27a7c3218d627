"""Chapter 7's yardstick: torch's 2-D composition (DTensor TP + FSDP2) beside ours.

One world-4 spawn trains, on every rank and on the same global batches, the single-device
GPT, torch's dp2 x tp2 (DTensor tensor parallelism on mesh["tp"], ``fully_shard`` on
mesh["dp"]) without and with sequence parallelism, and ours (``parallelize`` on
``Topology(2, 1, 2)``): three SGD-with-momentum steps, two optimizer groups, tied weights,
gradient clipping that binds. Losses, norms and the gathered final parameters must agree
with the single device at fp32 tolerance (seen on the 2-core CPU box, torch 2.13: losses
rel <= 1.2e-7, parameters <= 2.1e-8 absolute).
"""

import functools

import pytest
import torch
import torch_hybrid_workers as W

from course_lib.launch import run_distributed
from course_lib.parallel.torch_hybrid import check_torch_hybrid, torch_parallelize

RTOL, ATOL = 1.3e-6, 1e-5  # fp32, the order of a sum changed (DESIGN.md section 5)
RUNS = ["torch", "torch_sp", "ours"]


@functools.cache
def results() -> list[dict]:
    """Per rank: the reference and each run's losses, norms and final parameters."""
    return run_distributed(W.every_run, W.DP * W.TP, timeout_s=150)


@pytest.mark.timeout(200)
@pytest.mark.parametrize("run", RUNS)
def test_torch_2d_and_ours_match_one_device(run):
    for rank, out in enumerate(results()):
        want, got = out["reference"], out[run]
        where = f"{run} rank {rank}"
        assert min(want["norms"]) > W.CLIP, "the clipping must bind for the test to check it"
        torch.testing.assert_close(got["losses"], want["losses"], rtol=RTOL, atol=ATOL,
                                   msg=f"{where}: losses")  # fmt: skip
        torch.testing.assert_close(got["norms"], want["norms"], rtol=1e-5, atol=0,
                                   msg=f"{where}: norms")  # fmt: skip
        for name, p in want["state"].items():  # the tied matrix once, as wte.weight
            torch.testing.assert_close(got["state"][name], p, rtol=RTOL, atol=ATOL,
                                       msg=lambda m, w=f"{where}: {name}": f"{w}: {m}")  # fmt: skip


@pytest.mark.timeout(200)
def test_torch_2d_splits_each_tp_slice_again_over_dp():
    out = results()
    for run in RUNS:  # the loss is the global mean: one number on every rank
        assert len({tuple(o[run]["losses"]) for o in out}) == 1, run
    for rank, o in enumerate(out):
        for run in ("torch", "torch_sp"):
            rows = W.CONFIG.vocab_size // (W.DP * W.TP)  # V / tp vocab rows, then / dp
            assert o[run]["wte_local"] == (rows, W.CONFIG.n_embd), (run, rank)
            assert o[run]["tied"], (run, rank)  # one Parameter for embedding and head


def test_a_grid_torch_cannot_make_is_refused_with_the_fix():
    with pytest.raises(ValueError, match=r"dp=3 x tp=2 = 6 ranks, but the run has 4"):
        check_torch_hybrid(W.CONFIG, 3, 2, 4)
    with pytest.raises(ValueError, match=r"tp=3 does not divide n_head=4"):
        check_torch_hybrid(W.CONFIG, 1, 3, 3)
    with pytest.raises(ValueError, match=r"T=7; use T a multiple of 2"):
        check_torch_hybrid(W.CONFIG, 2, 2, 4, seq_len=7, sequence_parallel=True)
    check_torch_hybrid(W.CONFIG, 2, 2, 4, seq_len=7)  # without sequence parallelism T is free
    with pytest.raises(ValueError, match="needs a process group"):
        torch_parallelize(W.model(), 2, 2)
