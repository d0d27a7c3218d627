"""Chapter 7: DP x PP x TP composed in one place computes what one device computes.

One spawn at world size 4 runs every shape (each axis alone at 4, each pair at 2 x 2,
sequence parallelism on where tp > 1, ZeRO-1 and -2 on the dp axis), one at world size 8
the 2 x 2 x 2 grid, each for three SGD-with-momentum steps (two optimizer groups) with
gradient clipping that binds; every rank's pieces, the gathered model, the losses and the
norms are compared with the single device (tied weights throughout), the replicas of a dp
group must be bitwise equal, and ZeRO's held bytes must be 1/dp of the stage's.
"""

import functools

import compose_workers as W
import pytest
import torch

from course_lib.launch import run_distributed
from course_lib.parallel.compose import check_hybrid

RTOL, ATOL = 1.3e-6, 1e-5  # fp32, the order of a sum changed (DESIGN.md section 5)

SHAPES = [  # ((dp, pp, tp), sequence parallel, ZeRO stage on dp)
    ((2, 2, 1), False, 0),
    ((2, 1, 2), False, 0),
    ((1, 2, 2), False, 0),
    ((4, 1, 1), False, 0),
    ((1, 4, 1), False, 0),
    ((1, 1, 4), False, 0),
    ((1, 2, 2), True, 0),
    ((2, 1, 2), True, 0),
    ((2, 2, 1), False, 1),
    ((2, 1, 2), True, 1),
    ((4, 1, 1), False, 2),
    ((2, 2, 2), False, 0),
    ((2, 2, 2), True, 1),
    ((2, 2, 2), False, 2),
]


@functools.cache
def results(world: int) -> list[list[dict]]:
    """Every shape of ``world`` ranks, one spawn: per rank, one result per shape."""
    shapes = [s for s in SHAPES if s[0][0] * s[0][1] * s[0][2] == world]
    return run_distributed(W.every_shape, world, shapes, timeout_s=240)


def result(i: int) -> list[dict]:
    """Shape ``i``'s result on every rank of its world."""
    shape = SHAPES[i]
    world = shape[0][0] * shape[0][1] * shape[0][2]
    j = [s for s in SHAPES if s[0][0] * s[0][1] * s[0][2] == world].index(shape)
    return [per_shape[j] for per_shape in results(world)]


IDS = [f"{s}-sp{int(sp)}-zero{z}" for s, sp, z in SHAPES]


def _close(pair, what: str) -> None:
    got, want = pair
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=IDS)
def test_every_shape_matches_one_device(i):
    shape, sp, zero = SHAPES[i]
    for rank, out in enumerate(result(i)):
        where = f"{shape} sp={sp} zero={zero} rank {rank}"
        got, want = out["losses"]
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=f"{where}: losses")
        got, want = out["norms"]
        assert min(want) > W.CLIP, "the clipping must bind for the test to check it"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0, msg=f"{where}: norms")
        for name, pair in out["pieces"].items():
            _close(pair, f"{where}: {name}")
        for name, pair in out["full"].items():
            _close(pair, f"{where}: gathered {name}")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=IDS)
def test_replicas_of_a_dp_group_are_bitwise_equal(i):
    by_place: dict[tuple[int, int], list[dict]] = {}  # (pp, tp) -> that place's replicas
    for out in result(i):
        _, pp_rank, tp_rank = out["coords"]
        by_place.setdefault((pp_rank, tp_rank), []).append(out)
    for place, replicas in by_place.items():
        first = replicas[0]
        for other in replicas[1:]:
            assert other["losses"][0] == first["losses"][0], place
            for name, (got, _) in other["pieces"].items():
                assert torch.equal(got, first["pieces"][name][0]), (SHAPES[i], place, name)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("i", range(len(SHAPES)), ids=IDS)
def test_zero_holds_a_dp_th_of_the_state(i):
    """Optimizer state (one momentum per element) is the stage's / dp under ZeRO; ZeRO-2's
    gradient too; without ZeRO both are whole. Exact bytes, padding included."""
    shape, _, zero = SHAPES[i]
    for out in result(i):
        memory, whole = out["memory"], 4 * out["local_numel"]
        assert memory["params"] == 4 * sum(out["shard_numels"]) * shape[0] if zero else whole
        piece = 4 * sum(out["shard_numels"])
        assert memory["optimizer"] == (piece if zero else whole), (shape, zero, memory)
        assert memory["grads"] == (piece if zero == 2 else memory["params"]), (shape, zero)


def test_bad_shapes_are_refused_with_the_fix():
    cfg = W.CONFIG
    with pytest.raises(ValueError, match="tp=3 does not divide n_head=4"):
        check_hybrid(cfg, 1, 1, 3, schedule="1f1b", microbatches=2)
    with pytest.raises(ValueError, match="pp=5 stages but only n_layer=4"):
        check_hybrid(cfg, 1, 5, 1, schedule="1f1b", microbatches=5)
    with pytest.raises(ValueError, match="does not split into dp=2 replicas x 4 micro-batches"):
        check_hybrid(cfg, 2, 2, 1, schedule="1f1b", microbatches=4, global_batch=12)
    with pytest.raises(ValueError, match="at least as many micro-batches as stages"):
        check_hybrid(cfg, 1, 4, 1, schedule="1f1b", microbatches=2, global_batch=8)
    with pytest.raises(ValueError, match="sequence length divisible by 2"):
        check_hybrid(cfg, 1, 1, 2, schedule="1f1b", microbatches=2, sequence_parallel=True,
                     seq_len=7)  # fmt: skip
    with pytest.raises(ValueError, match="zero_stage=3"):
        check_hybrid(cfg, 2, 1, 1, schedule="1f1b", microbatches=2, zero_stage=3)
    with pytest.raises(ValueError, match="interleaved schedule"):
        check_hybrid(cfg, 1, 2, 1, schedule="interleaved", microbatches=2)
