"""Chapter 6: tensor parallelism computes what one device computes, and sends what the formula says.

One spawn per tensor-parallel size (1, 2, 3, 4) runs every model configuration (tied and
untied weights, sequence parallelism on and off, our ring or torch's collectives, padded
vocabularies) and, at 2 and 4, the layer-level checks; the tests below read its results.
"""

import functools

import pytest
import torch
import tp_workers as W

from course_lib.cost.tensor_model import parameter_count_per_rank
from course_lib.launch import run_distributed
from course_lib.model import GPTConfig
from course_lib.parallel.tensor_gpt import check_tensor_parallel

RTOL, ATOL = 1e-5, 1e-6  # fp32, a sum's order changed

CASES = {
    1: [dict(sp=False), dict(sp=True)],
    2: [
        dict(sp=False, steps=3),
        dict(sp=True, steps=3),
        dict(sp=False, collectives="torch"),
        dict(sp=True, collectives="torch"),
        dict(sp=False, config=dict(tie_weights=False), steps=2),
        dict(sp=True, config=dict(tie_weights=False, vocab_size=255)),  # padded to 256
        dict(sp=True, rg=True, steps=2),  # Megatron's SP: the column inputs gathered again
    ],
    # 3 divides 6 heads and the MLP's 4 * 48; the vocabulary 256 is padded to 258
    3: [dict(sp=sp, config=dict(n_head=6, n_embd=48, block_size=6), steps=2) for sp in (0, 1)],
    4: [
        dict(sp=False, config=dict(vocab_size=250), steps=2),  # padded to 252
        dict(sp=True, config=dict(vocab_size=250), steps=2),
        dict(sp=True, collectives="torch"),
        dict(sp=True, rg=True, config=dict(vocab_size=250)),
    ],
}


@functools.cache
def results(tp: int) -> list[dict]:
    return run_distributed(W.everything, tp, CASES[tp], tp in (2, 4), timeout_s=240)


def _close(pair, what):
    got, want = pair
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_loss_gradients_and_steps_equal_one_device(tp):
    for rank, out in enumerate(results(tp)):
        for case, res in zip(CASES[tp], out["models"], strict=True):
            where = f"tp={tp} rank {rank} {case}"
            config = W.config(**case.get("config", {}))
            assert res["held"] == parameter_count_per_rank(config, tp), where  # the formula
            for step, s in enumerate(res["steps"]):
                got, want = s["loss"]
                assert got == pytest.approx(want, rel=1e-6), (where, step)
                assert len(s["grads"]) > 0
                for name, pair in s["grads"].items():
                    _close(pair, f"{where} step {step}: gradient of {name}")
            for name, pair in res["params"].items():  # gathered whole after the steps
                _close(pair, f"{where}: {name} after {len(res['steps'])} steps")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [2, 4])
def test_layers(tp):
    for rank, out in enumerate(results(tp)):
        # Exactly this rank's rows of W times X: no reduction, nothing else. (Against the
        # slice of the whole layer's output it is equal to fp32 rounding only: BLAS picks
        # another kernel, so another order of the same sum, for 2 columns than for 8.)
        got, want = out["layers"]["column"]
        assert torch.equal(got, want), f"rank {rank}: column-parallel output is not its rows'"
        for key, pair in out["layers"].items():
            _close(pair, f"tp={tp} rank {rank}: {key}")


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy_equals_f_cross_entropy(tp):
    for rank, out in enumerate(results(tp)):
        assert set(out["entropy"]) == {12 * tp, 12 * tp - 1}  # without and with padding
        for vocab, res in out["entropy"].items():
            torch.testing.assert_close(*res["loss"], rtol=1e-12, atol=1e-12)
            where = f"rank {rank} V={vocab}"
            torch.testing.assert_close(*res["grad"], rtol=1e-10, atol=1e-12,
                                       msg=lambda m, w=where: f"{w}: {m}")  # fmt: skip


@pytest.mark.parametrize("tp", [2, 4])
def test_every_operator_passes_gradcheck_in_float64(tp):
    for rank, out in enumerate(results(tp)):
        assert out["gradcheck"] == dict.fromkeys(out["gradcheck"], True), (rank, out["gradcheck"])
        assert len(out["gradcheck"]) == 5


@pytest.mark.parametrize("tp", [2, 4])
def test_block_bytes_equal_the_formula(tp):
    """Per block per pass: 2 all-reduces of B*T*d; with SP 2 reduce-scatters + 2 all-gathers.

    Recomputing the gather (Megatron's SP) adds one all-gather per column layer in backward.
    """
    for rank, out in enumerate(results(tp)):
        assert len(out["bytes"]) == 3
        for (sp, rg), res in out["bytes"].items():
            n_bytes = res["B"] * res["T"] * res["d"] * 4
            one = (tp - 1) * n_bytes // tp  # a ring reduce-scatter or all-gather
            if sp:
                want = {"ring_reduce_scatter": 2 * one, "ring_all_gather": 2 * one}
            else:
                want = {"ring_all_reduce": 2 * 2 * one}
            assert res["forward"] == want, (rank, sp, rg)
            if rg:
                want = {"ring_reduce_scatter": 2 * one, "ring_all_gather": 4 * one}
            assert res["backward"] == want, (rank, sp, rg)
            assert sum(res["forward"].values()) == 4 * one  # the same total with or without SP


@pytest.mark.parametrize("tp", [2, 4])
def test_dropout_same_on_the_stream_different_inside_the_split(tp):
    out = results(tp)
    for other in out[1:]:
        assert torch.equal(other["dropout"]["stream"], out[0]["dropout"]["stream"])
        assert torch.equal(other["dropout"]["outside"], out[0]["dropout"]["outside"])
        assert not torch.equal(other["dropout"]["inside"], out[0]["dropout"]["inside"])


def test_a_split_that_cannot_work_is_refused_with_the_choices():
    cfg = GPTConfig(n_head=4, n_embd=32)
    with pytest.raises(ValueError, match=r"tp=3 does not divide n_head=4.*tp in \[1, 2, 4\]"):
        check_tensor_parallel(cfg, 3)
    with pytest.raises(ValueError, match="T=10 positions over tp=4 ranks"):
        check_tensor_parallel(cfg, 4, 10, sequence_parallel=True)
    check_tensor_parallel(cfg, 4, 10, sequence_parallel=False)  # no split of the sequence
    with pytest.raises(ValueError, match="integer >= 1"):
        check_tensor_parallel(cfg, 0)


@pytest.mark.parametrize("tp", [2, 4])
def test_same_loss_and_gradients_as_torch_dtensor(tp):
    """Ours and torch's ColwiseParallel / RowwiseParallel / SequenceParallel / loss_parallel."""
    for rank, out in enumerate(results(tp)):
        for sp, res in out["torch"].items():
            ours, theirs = res["loss"]
            assert ours == pytest.approx(theirs, rel=1e-6), (rank, sp)
            assert set(res["ours"]) - {"lm_head.weight"} == set(res["torch"]), (rank, sp)
            for name, want in res["torch"].items():
                _close((res["ours"][name], want), f"tp={tp} rank {rank} sp={sp}: {name}")
