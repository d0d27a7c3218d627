"""Chapter 7's helpers (course_lib/chapters/ch07_3d.py): the grid, equivalence, bytes per axis.

One 4-rank spawn (cached) runs :func:`ch07_3d.equivalence_worker` on two configurations;
its reports feed both the equivalence rows and the grid join. Everything else is pure
arithmetic on the cost model, checked against numbers worked out by hand.
"""

import dataclasses
import functools

import pytest
import torch

from course_lib.chapters import ch07_3d as ch7
from course_lib.cost import clusters
from course_lib.cost.planner_model import Choice
from course_lib.cost.tensor_model import block_comm_bytes
from course_lib.launch import run_distributed
from course_lib.model import GPTConfig

SHAPES = [((2, 1, 2), True, 1), ((1, 2, 2), False, 0)]  # SP + ZeRO-1; pipeline x tensor


@functools.cache
def reports() -> list[list[dict]]:
    return run_distributed(ch7.equivalence_worker, 4, SHAPES, steps=2, timeout_s=240)


@pytest.mark.timeout(300)
def test_every_configuration_matches_the_single_device():
    rows = ch7.equivalence_rows(SHAPES, reports())
    assert [r["config"] for r in rows] == ["dp2 pp1 tp2 +SP +ZeRO-1", "dp1 pp2 tp2"]
    for r in rows:
        assert r["loss_diff"] < 1e-5 and r["param_diff"] < 1e-5, r
        assert r["replicas_equal"], r
        assert len(r["losses"]) == 2 and r["losses"][0] > 0


@pytest.mark.timeout(300)
def test_the_ranks_report_the_grid_they_built():
    grid = ch7.join_places([rank[0] for rank in reports()])  # (dp, pp, tp) = (2, 1, 2)
    assert grid["coords"] == {0: (0, 0, 0), 1: (0, 0, 1), 2: (1, 0, 0), 3: (1, 0, 1)}
    assert grid["tp"] == [(0, 1), (2, 3)]
    assert grid["dp"] == [(0, 2), (1, 3)]
    assert grid["pp"] == [(0,), (1,), (2,), (3,)]
    grid = ch7.join_places([rank[1] for rank in reports()])  # (1, 2, 2)
    assert grid["pp"] == [(0, 2), (1, 3)] and grid["tp"] == [(0, 1), (2, 3)]


def _place(rank, coords, dp, pp, tp):
    return {"rank": rank, "coords": coords, "dp": dp, "pp": pp, "tp": tp}


def test_join_places_refuses_ranks_that_disagree():
    places = [_place(0, (0, 0, 0), [0], [0], [0, 1]), _place(1, (0, 0, 1), [1], [1], [1, 2])]
    with pytest.raises(ValueError, match="tp groups disagree: rank 1 is in"):
        ch7.join_places(places)
    with pytest.raises(ValueError, match="rank 0 is not in its own dp group"):
        ch7.join_places([_place(0, (0, 0, 0), [1], [0], [0])])


def _report(coords, losses, pieces, error=0.0):
    return {"coords": coords, "losses": losses, "want_losses": [1.0, 2.0],
            "pieces": torch.tensor(pieces), "param_error": error}  # fmt: skip


def test_equivalence_rows_catch_a_drifting_replica_and_a_wrong_loss():
    shapes = [((2, 1, 1), False, 0)]
    same = [[_report((0, 0, 0), [1.0, 2.0], [1.0])], [_report((1, 0, 0), [1.0, 2.0], [1.0])]]
    (row,) = ch7.equivalence_rows(shapes, same)
    assert row["replicas_equal"] and row["loss_diff"] == 0.0
    drift = [same[0], [_report((1, 0, 0), [1.0, 2.5], [1.0 + 1e-7], error=3e-3)]]
    (row,) = ch7.equivalence_rows(shapes, drift)
    assert not row["replicas_equal"]
    assert row["loss_diff"] == pytest.approx(0.5) and row["param_diff"] == 3e-3
    assert "dp2 pp1 tp1" in ch7.format_equivalence([row])


GRID_222 = {
    "coords": {r: (r // 4, r // 2 % 2, r % 2) for r in range(8)},
    "dp": [(0, 4), (1, 5), (2, 6), (3, 7)],
    "pp": [(0, 2), (1, 3), (4, 6), (5, 7)],
    "tp": [(0, 1), (2, 3), (4, 5), (6, 7)],
}


def test_holdings_say_what_each_rank_holds_and_whom_it_talks_to():
    rows = ch7.holdings(GRID_222, GPTConfig(n_layer=4, n_head=4, vocab_size=256))
    five = rows[5]
    assert five["coords"] == (1, 0, 1) and five["blocks"] == [0, 1]
    assert five["extra"] == ["embedding"] and five["heads"] == [2, 3]
    assert five["vocab"] == (128, 256)
    assert (five["tp"], five["pp"], five["dp"]) == ([4], [7], [1])
    assert rows[2]["extra"] == ["head"] and rows[2]["blocks"] == [2, 3]
    text = ch7.format_holdings(rows)
    assert "0-1 +embedding" in text and len(text.splitlines()) == 2 + 8


CFG = GPTConfig(n_layer=8, n_head=8, n_embd=256, block_size=128, vocab_size=1024)


def test_axis_bytes_are_the_chapters_formulas():
    c = Choice(dp=4, pp=2, tp=4, microbatches=3)
    b, seq, s = 2, 128, 2  # bf16
    got = ch7.axis_bytes(CFG, c, b, seq, precision="mixed")
    act = b * seq * CFG.n_embd * s
    assert got["pp"] == 2 * 3 * act  # activation forward, its gradient backward, per micro-batch
    # tp: the last stage's 4 blocks, each 2 passes of block_comm_bytes, per micro-batch,
    # plus the head's all-reduce (backward) and the loss's two small fp32 collectives
    blocks = 4 * 2 * block_comm_bytes(b, seq, CFG.n_embd, 4, False, s)["total"]
    head = 2 * 3 * act // 4
    loss = 3 * (4 * b * seq) // 4 * 4 + 2 * 3 * (2 * b * seq) // 4 * 4
    assert got["tp"] == 3 * (blocks + head + loss)
    with_sp = ch7.axis_bytes(CFG, dataclasses.replace(c, sequence_parallel=True), b, seq)
    assert with_sp["pp"] == got["pp"] / 4  # the stream between stages is cut along T


def test_dp_bytes_are_a_ring_all_reduce_of_the_largest_stage():
    c = Choice(dp=4, pp=1, tp=1, microbatches=1)
    got = ch7.axis_bytes(CFG, c, 1, 128)
    n = 12 * CFG.n_layer * CFG.n_embd**2  # the blocks' matrices alone: a lower bound
    assert got["tp"] == got["pp"] == 0
    assert got["dp"] > 2 * 3 / 4 * n * 2  # 2 (dp-1)/dp x bf16 gradients
    assert ch7.axis_bytes(CFG, dataclasses.replace(c, dp=1), 1, 128)["dp"] == 0


def test_axis_traffic_puts_each_axis_on_both_links():
    c = Choice(dp=2, pp=2, tp=8, microbatches=8)
    rows = ch7.axis_traffic(CFG, clusters.H100_CLUSTER, c, global_batch=32, seq=128)
    by = {r["axis"]: r for r in rows}
    assert set(by) == {"tp", "pp", "dp", "compute"}
    for axis in ("tp", "pp", "dp"):
        assert by[axis]["inter_s"] > by[axis]["intra_s"] > 0, axis
    ratio = by["tp"]["inter_s"] / by["tp"]["intra_s"]  # 450 GB/s against 50, alpha aside
    assert 2 < ratio <= 9
    assert by["compute"]["intra_s"] == by["compute"]["inter_s"] > 0
    assert "InfiniBand" in ch7.format_traffic(rows)


def test_calibrated_cluster_uses_the_measured_constants():
    constants = {"flop_s": 5e9, "pairs": {"alpha_s": 1e-3, "beta": 1e-9},
                 "world": {"alpha_s": 2e-3, "beta": 2e-9}}  # fmt: skip
    from course_lib.cost.clusters import laptop_cluster
    from course_lib.cost.measure_hybrid import calibrated_cluster

    cluster = calibrated_cluster({**constants, "optimizer_s_per_param": 7e-9}, 4)
    assert cluster.peak_flops == 5e9 and cluster.intra.alpha_s == 1e-3
    assert cluster.optimizer_s_per_param == 7e-9
    assert cluster.intra.bandwidth_bytes_per_s == pytest.approx(1e9)
    assert calibrated_cluster(constants, 4, "world").inter.alpha_s == 2e-3
    with pytest.raises(ValueError, match="fit must be 'pairs' or 'world'"):
        calibrated_cluster(constants, 4, "ring")
    bad = {**constants, "pairs": {"alpha_s": 1e-3, "beta": 0.0}}
    fallback = calibrated_cluster(bad, 4)  # an unresolved beta keeps the stored one
    assert fallback.intra.bandwidth_bytes_per_s == laptop_cluster(4).intra.bandwidth_bytes_per_s
    assert "the stored beta used" in fallback.intra.name


def test_shape_label():
    assert ch7.shape_label((2, 2, 1)) == "dp2 pp2 tp1"
    assert ch7.shape_label((1, 2, 2), True, 1) == "dp1 pp2 tp2 +SP +ZeRO-1"
