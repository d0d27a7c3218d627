"""Chapter 6's measurements: the formulas of cost/tensor_model.py against what the ranks do.

One spawn per tensor-parallel size (2 and 4, :func:`chapter6_workers.everything`) measures
the bytes our counter sees, the bytes autograd saves and the parameters each rank holds;
at tp = 2 it also runs every variant of ``measure_worker`` once (tiny sizes, one step;
no timing is ever asserted). The formulas must match to the byte.
"""

import functools
import math

import chapter6_workers as W
import pytest

from course_lib.chapters import ch06_tensor as ch6
from course_lib.cost import tensor_model as tm
from course_lib.launch import run_distributed


@functools.cache
def results(tp: int) -> list[dict]:
    return run_distributed(W.everything, tp, tp == 2, timeout_s=240)


@functools.cache
def single() -> dict:
    return ch6.single_device_step(W.timed_config(), *W.TIMED, steps=1, warmup=0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [2, 4])
def test_bytes_per_step_equal_the_formula_exactly_on_every_rank(tp):
    sent = {}
    for rank, out in enumerate(results(tp)):
        assert set(out["bytes"]) == {False, True, "recompute"}
        for sp, shape in ((False, W.PLAIN), (True, W.SP), ("recompute", W.SP)):
            res = out["bytes"][sp]
            want = tm.model_comm_bytes(W.CONFIG, shape["batch_size"], shape["seq"], tp,
                                       bool(sp), rank=rank,
                                       recompute_all_gather=sp == "recompute")  # fmt: skip
            assert res["formula"] == want
            assert res["bytes_sent"] == want["total"], (rank, sp, res, want)
            assert sum(res["by_collective"].values()) == res["bytes_sent"]
            kinds = {"ring_all_reduce", "ring_all_gather"}  # the loss's two, and f / g
            assert set(res["by_collective"]) == kinds | ({"ring_reduce_scatter"} if sp else set())
            sent.setdefault(sp, []).append(res["bytes_sent"])
    if tp == 4:  # 2M = 30 elements in 4 ring chunks (8, 8, 7, 7): ranks send different bytes
        assert len(set(sent[False])) > 1, sent
    assert len(set(sent[True])) == 1  # with SP every count divides by tp


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [2, 4])
def test_activation_and_parameter_bytes_equal_the_formulas(tp):
    for rank, out in enumerate(results(tp)):
        cases = [(W.PLAIN, False, out["memory"]["plain"])]
        cases += [(W.SP, sp, out["memory"]["sp"][sp]) for sp in (False, True, "recompute")]
        for shape, sp, res in cases:
            where = (rank, shape, sp)
            assert res["activation_bytes"] == res["activation_formula"], where
            want = tm.tp_activation_bytes(W.CONFIG, shape["batch_size"], shape["seq"], tp,
                                          bool(sp), recompute_all_gather=sp == "recompute")
            assert res["activation_formula"] == want == sum(res["activation_terms"].values())
            assert res["param_bytes"] == res["param_formula"], where
            assert res["param_formula"] == 4 * tm.parameter_count_per_rank(W.CONFIG, tp)
        plain, sp = out["memory"]["sp"][False], out["memory"]["sp"][True]
        assert sp["activation_bytes"] < plain["activation_bytes"]  # SP shards the LN region
        megatron = out["memory"]["sp"]["recompute"]  # and the column inputs too
        assert megatron["activation_bytes"] < sp["activation_bytes"]


@pytest.mark.timeout(300)
def test_measure_worker_returns_every_variant_with_sane_values():
    tp, config = 2, W.timed_config()
    ranks = [out["measure"] for out in results(tp)]
    for rank, res in enumerate(ranks):
        assert set(res) == set(ch6.VARIANTS)
        for v, r in res.items():
            whose, sp, collectives = ch6.VARIANTS[v]
            assert r["step_s"] > 0 and len(r["step_times"]) == 1, v
            assert (r["comm_s"] is None) == (whose == "torch"), v
            assert r["comm_s"] is None or 0 <= r["comm_s"] <= r["step_s"], v
            if collectives == "ours":
                want = tm.model_comm_bytes(config, *W.TIMED, tp, sp, rank=rank,
                                           recompute_all_gather=v in ch6.RECOMPUTE)["total"]
                assert r["bytes_per_step"] == want, (rank, v)
            else:
                assert r["bytes_per_step"] is None, v
            assert r["param_bytes"] == 4 * tm.parameter_count_per_rank(config, tp), v
            assert len(r["losses"]) == 1 and math.isfinite(r["losses"][0])


def test_ours_and_torchs_first_losses_are_the_reference_loss():
    for res in (out["measure"] for out in results(2)):
        for v, r in res.items():
            assert r["losses"][0] == pytest.approx(single()["losses"][0], rel=1e-6), v


def test_rows_and_format_table_render():
    config = W.timed_config()
    table = [ch6.single_row(config, *W.TIMED, single())]
    table += ch6.rows(config, *W.TIMED, [out["measure"] for out in results(2)], single=single())
    assert [r["variant"] for r in table] == ["1 device", *ch6.VARIANTS]
    for r in table:
        assert r["param_ratio"] == 1.0, r["variant"]
        if r["variant"] in ("ours", "ours-sp"):
            assert r["bytes_ratio"] == 1.0
        if r["variant"].startswith("ours"):
            assert r["vs_torch"] > 0 and r["speedup"] > 0 and r["comm_share"] is not None
    assert table[0]["act_ratio"] == 1.0  # chapter 0's formula, on one device
    text = ch6.format_table(table)
    lines = text.splitlines()
    assert len(lines) == 2 + len(table) and "/DTensor" in lines[0]
    assert all(len(line) == len(lines[0]) for line in lines), text


def test_bad_variants_are_refused_before_any_message():
    with pytest.raises(ValueError, match="unknown variants.*choose among"):
        ch6.check_variants(["ring"], W.CONFIG, 8, 2)
    with pytest.raises(ValueError, match="T=5 positions over tp=2"):
        ch6.check_variants(["ours-sp"], W.CONFIG, 5, 2)
    with pytest.raises(ValueError, match="a list of names"):
        ch6.check_variants("ours", W.CONFIG, 8, 2)
    with pytest.raises(ValueError, match="need steps >= 1"):
        ch6.single_device_step(W.CONFIG, 2, 8, steps=0)


@pytest.mark.parametrize("tp", [2, 4])
def test_gradients_worker_finds_every_gradient_equal_to_one_device(tp):
    names = {n for n, _ in ch6.reference(W.CONFIG).named_parameters()}
    for rank, out in enumerate(results(tp)):
        assert set(out["gradients"]) == set(ch6.SP_MODES)
        for mode, errors in out["gradients"].items():
            assert set(errors) == names | {"loss"}, (rank, mode)
            assert max(errors.values()) < 1e-6, (rank, mode, errors)
