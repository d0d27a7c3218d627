"""The topology (chapter 7): ranks on the DP x PP x TP grid, the groups of each axis, refusals.

Expected values are computed here from the formula, independently of the library:
``global rank = (dp_index * pp + pp_index) * tp + tp_index`` (picotron's
``torch.arange(world).view(dp, pp, tp)``). One spawn per world size builds every grid of
that size in turn and reports what each rank saw, so the distributed tests cost four spawns.
"""

from __future__ import annotations

import itertools
import re

import pytest
import topology_workers as workers
import torch

from course_lib.launch import run_distributed
from course_lib.topology import Topology, factorisations, print_rank0

pytestmark = pytest.mark.timeout(120)

GRIDS = {  # world size -> the (dp, pp, tp) grids built in that world's one spawn
    1: [(1, 1, 1)],
    2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
    3: [(3, 1, 1), (1, 3, 1), (1, 1, 3)],
    4: [(2, 1, 2), (4, 1, 1), (1, 1, 4), (2, 2, 1), (1, 2, 2)],
}
CASES = [(world, i) for world, grids in GRIDS.items() for i in range(len(grids))]
_runs: dict[int, list] = {}


def run(world: int) -> list:
    """Every rank's report for ``world`` (spawned once per world size, then cached)."""
    if world not in _runs:
        _runs[world] = run_distributed(workers.check_grids, world, GRIDS[world], timeout_s=60)
    return _runs[world]


def expected_groups(dp: int, pp: int, tp: int, d: int, p: int, t: int) -> dict[str, list[int]]:
    """The global ranks of the dp, pp and tp groups through grid point (d, p, t)."""
    at = lambda d, p, t: (d * pp + p) * tp + t
    return {
        "dp": [at(i, p, t) for i in range(dp)],
        "pp": [at(d, i, t) for i in range(pp)],
        "tp": [at(d, p, i) for i in range(tp)],
    }


# ---- real ranks ---------------------------------------------------------------------------


@pytest.mark.parametrize("world, i", CASES, ids=[f"world{w}-{GRIDS[w][i]}" for w, i in CASES])
def test_every_rank_sits_where_the_formula_says_and_its_groups_connect_only_it(world, i):
    dp, pp, tp = GRIDS[world][i]
    grid = torch.arange(world).view(dp, pp, tp)  # (dp, pp, tp): picotron's layout
    all_coords = list(itertools.product(range(dp), range(pp), range(tp)))  # rank order
    for rank, result in enumerate(run(world)):
        rep = result["reports"][i]
        d, p, t = all_coords[rank]
        assert (d * pp + p) * tp + t == rank == grid[d, p, t].item()
        assert rep["sizes"] == (dp, pp, tp) and rep["world_size"] == world
        assert rep["rank"] == rank and rep["coords"] == (d, p, t)
        assert rep["all_coords"] == all_coords
        assert rep["round_trip"] == list(range(world))
        groups = expected_groups(dp, pp, tp, d, p, t)
        assert rep["ranks"] == groups
        for axis, members in groups.items():
            probe = rep["probes"][axis]
            assert probe["members"] == members, axis  # the real process group's ranks
            assert probe["sum"] == sum(members), axis  # all_reduce reached exactly them
            assert probe["gathered"] == members, axis  # in group order
        assert rep["first_last"] == (p == 0, p == pp - 1)
        assert rep["describe"] == {"dp": dp, "pp": pp, "tp": tp, "world_size": world}


@pytest.mark.parametrize("world, i", [(4, 0), (4, 4), (3, 2)])
def test_repr_draws_the_grid_with_this_rank_marked(world, i):
    dp, pp, tp = GRIDS[world][i]
    for rank, result in enumerate(run(world)):
        lines = result["reports"][i]["repr"].splitlines()
        d, p, t = rank // (pp * tp), rank // tp % pp, rank % tp
        assert lines[0] == (
            f"Topology(dp={dp}, pp={pp}, tp={tp}), rank {rank} = (dp {d}, pp {p}, tp {t})"
        )
        assert len(lines) == 1 + dp * pp  # one line per (dp, pp) row
        marked = [line for line in lines[1:] if f"[{rank}]" in line]
        assert marked == [lines[1 + d * pp + p]]
        assert f"dp {d} pp {p}" in marked[0]
        for row, line in enumerate(lines[1:]):
            assert [int(n) for n in re.findall(r"\d+", line.split("tp:")[1])] == list(
                range(row * tp, (row + 1) * tp)
            )


@pytest.mark.parametrize("world", [2, 3, 4])
def test_a_grid_that_does_not_fill_the_world_is_refused_on_every_rank(world):
    valid = ", ".join(f"({a},{b},{c})" for a, b, c in factorisations(world))
    for result in run(world):
        message = result["too_many"]
        assert message is not None
        assert f"dp={world} x pp=1 x tp=2 = {2 * world} ranks" in message
        assert f"the world has {world}" in message
        assert f"valid (dp, pp, tp) for {world} ranks: {valid}" in message


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_that_ask_for_different_grids_all_refuse_then_carry_on(world):
    for rank, result in enumerate(run(world)):
        assert f"rank 0: ({world}, 1, 1), rank 1: (1, 1, {world})" in result["disagree"]
        still = result["still_works"]  # a fresh Topology after both refusals
        assert still["ranks"]["dp"] == list(range(world))
        assert still["probes"]["dp"]["sum"] == sum(range(world))
        assert still["coords"] == (rank, 0, 0)


def test_print_rank0_prints_on_rank_0_only():
    printed = [result["printed"] for result in run(4)]
    assert printed == ["hello from rank 0\n", "", "", ""]


# ---- one process, no process group --------------------------------------------------------


def test_single_process_is_a_1x1x1_grid_without_groups(capsys):
    topo = Topology()
    assert (topo.dp, topo.pp, topo.tp, topo.world_size, topo.rank) == (1, 1, 1, 1, 0)
    assert (topo.dp_rank, topo.pp_rank, topo.tp_rank) == (0, 0, 0)
    assert (topo.dp_group, topo.pp_group, topo.tp_group) == (None, None, None)
    assert topo.dp_ranks() == topo.pp_ranks() == topo.tp_ranks() == [0]
    assert topo.is_first_stage and topo.is_last_stage
    assert topo.describe() == {"dp": 1, "pp": 1, "tp": 1, "world_size": 1}
    assert topo.coordinates(0) == (0, 0, 0) and topo.global_rank(0, 0, 0) == 0
    assert repr(topo).splitlines() == [
        "Topology(dp=1, pp=1, tp=1), rank 0 = (dp 0, pp 0, tp 0)",
        "  dp 0 pp 0 | tp: [0]",
    ]
    print_rank0(topo, "loss", 1.5)
    assert capsys.readouterr().out == "loss 1.5\n"


@pytest.mark.parametrize("sizes", [{"dp": 2}, {"pp": 2}, {"dp": 2, "tp": 2}])
def test_single_process_refuses_more_than_one_rank_and_says_how_to_launch(sizes):
    with pytest.raises(ValueError, match="no process group exists") as info:
        Topology(**sizes)
    assert "course_lib.launch.run_distributed or torchrun" in str(info.value)


@pytest.mark.parametrize("axis", ["dp", "pp", "tp"])
@pytest.mark.parametrize("bad", [0, -2, 1.5, 2.0, "2", True, None])
def test_sizes_must_be_integers_of_at_least_one(axis, bad):
    with pytest.raises(ValueError, match=rf"^{axis} must be an integer >= 1 .*got {bad!r}$"):
        Topology(**{axis: bad})


def test_indices_and_ranks_out_of_the_grid_are_refused():
    topo = Topology()
    with pytest.raises(ValueError, match=r"dp_index must be an integer in 0\.\.0, got 1"):
        topo.global_rank(1, 0, 0)
    with pytest.raises(ValueError, match=r"tp_index must be an integer in 0\.\.0, got -1"):
        topo.global_rank(0, 0, -1)
    for bad in (1, -1, 0.0):
        with pytest.raises(ValueError, match=rf"rank must be an integer in 0\.\.0, got {bad}"):
            topo.coordinates(bad)


def test_factorisations_lists_every_grid_largest_dp_first():
    assert factorisations(1) == [(1, 1, 1)]
    assert factorisations(4) == [(4, 1, 1), (2, 2, 1), (2, 1, 2), (1, 4, 1), (1, 2, 2), (1, 1, 4)]
    assert factorisations(7) == [(7, 1, 1), (1, 7, 1), (1, 1, 7)]
    twelve = factorisations(12)
    assert len(twelve) == len(set(twelve)) == 18
    assert all(dp * pp * tp == 12 for dp, pp, tp in twelve)


def test_single_is_one_process_without_groups():
    """The single-device reference's topology: rank 0 of 1, no group to talk over."""
    t = Topology.single()
    assert (t.dp, t.pp, t.tp, t.world_size) == (1, 1, 1, 1)
    assert (t.dp_rank, t.pp_rank, t.tp_rank) == (0, 0, 0)
    assert t.dp_group is None and t.pp_group is None and t.tp_group is None
    assert t.is_first_stage and t.is_last_stage and t.dp_ranks() == [0]
    assert t.describe() == {"dp": 1, "pp": 1, "tp": 1, "world_size": 1}
