"""Chapter 7: the planner's memory prediction against the bytes every rank really holds.

One world-4 spawn runs every configuration (dp2 x pp2, dp2 x tp2, pp2 x tp2, dp4, pp4,
tp4; ZeRO-1 and -2 where dp > 1; sequence parallelism on and off where tp > 1) for one
fp32 AdamW step (:func:`course_lib.cost.measure_hybrid.measure_configs`). On every rank
the planner's prediction for that rank's own stage must equal the measured parameter,
gradient and optimizer bytes exactly (vocabulary padding of tensor parallelism, the
tied copy on the last stage, ZeRO's flat-buffer padding, two AdamW groups) and the peak
saved activation bytes within 10 %. Step time is a benchmark (benchmarks/hybrid.py),
never asserted here. The pure helpers (padding, Spearman) are checked without a spawn.
"""

import functools

import planner_measured_workers as W
import pytest

from course_lib.cost import measure_hybrid as MH
from course_lib.cost import planner_model as PM
from course_lib.cost.clusters import laptop_cluster


@functools.cache
def compared() -> list[dict]:
    rows = MH.measure_jobs(W.JOBS, W.GLOBAL_BATCH, W.SEQ_LEN, steps=1, warmup=0, timeout_s=240)
    return MH.compare(rows, laptop_cluster(4))


LABELS = [f"{cfg.n_embd}d-{c.label()}" for cfg, c in W.JOBS]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("j", range(len(W.JOBS)), ids=LABELS)
def test_state_bytes_are_predicted_exactly_on_every_rank(j):
    rows = compared()[4 * j : 4 * j + 4]
    assert [r["label"] for r in rows] == [W.JOBS[j][1].label()] * 4
    for r in rows:
        for term in ("params", "grads", "optimizer"):
            where = f"{LABELS[j]} rank {r['rank']} (stage {r['stage']}): {term}"
            assert r[f"{term}_pred"] == r[f"{term}_meas"], where


@pytest.mark.timeout(300)
@pytest.mark.parametrize("j", range(len(W.JOBS)), ids=LABELS)
def test_activations_are_predicted_within_ten_percent(j):
    for r in compared()[4 * j : 4 * j + 4]:
        assert r["activations_meas"] > 0
        assert r["activations_ratio"] == pytest.approx(1.0, abs=0.10), (LABELS[j], r["rank"])


def test_the_padded_model_really_pads():
    assert W.padding_is_exercised()
    groups = PM.stage_group_counts(W.PADDED, 1, 1)[0]
    padded = PM.state_bytes(sum(groups), 4, 1, "fp32", groups=groups)
    assert padded["params"] > 4 * sum(groups)  # the zeros of the flat buffers count


def test_state_bytes_with_groups():
    plain = PM.state_bytes(100, 4, 2, "fp32")
    same = PM.state_bytes(100, 4, 2, "fp32", groups=(60, 40))  # both divide 4: no padding
    assert same == pytest.approx(plain)
    odd = PM.state_bytes(10, 4, 1, "fp32", groups=(7, 3))  # padded to 8 + 4
    assert odd == {"params": 4 * 12, "grads": 4 * 12, "optimizer": 8 * 3}
    with pytest.raises(ValueError, match="must sum to psi"):
        PM.state_bytes(11, 4, 1, "fp32", groups=(7, 3))


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("pp", [1, 2, 4])
def test_group_counts_sum_to_the_stages(tp, pp):
    pairs = PM.stage_group_counts(W.CONFIG, tp, pp)
    assert [a + b for a, b in pairs] == PM.stage_parameter_counts(W.CONFIG, tp, pp)
    assert all(a > b > 0 for a, b in pairs)


def test_spearman():
    assert MH.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert MH.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert MH.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6*4/120
    assert MH.spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)  # ties: mean ranks
    with pytest.raises(ValueError, match="same length"):
        MH.spearman([1, 2], [1])
