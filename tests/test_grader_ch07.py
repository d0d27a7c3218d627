"""Chapter 7's grader, run directly on attempts at the grid mapping: wrong ones get their hint.

Each attempt is a ``my_grid.py`` written into a temporary folder. The wrong attempts that
stage 1 (the functions as data) catches are checked in this process, with the very
function the spawned rank runs (:func:`~course_lib.grading.ch07_grid.check_functions`):
no spawn needed, so the suite stays cheap. The attempts that need a process group (one
that asks ``dist.get_rank()``, one whose groups differ between ranks) go through the whole
grader on real ranks, at world 4 to keep the module short (the notebook's grader cell runs
the default world 8); the valid variants run the live stage together, in one spawn.
"""

import json
from pathlib import Path

import grader_ch07_workers as W
import pytest

from course_lib import topology as T
from course_lib.grading import ch07_grid as grader
from course_lib.grading import core
from course_lib.grading.core import Case

# The solution (solutions/07_3d_parallelism.ipynb).
GOOD = """\
def grid_coordinates(rank, dp, pp, tp):
    return rank // (pp * tp), rank // tp % pp, rank % tp


def global_rank(dp_rank, pp_rank, tp_rank, dp, pp, tp):
    return (dp_rank * pp + pp_rank) * tp + tp_rank


def axis_groups(dp, pp, tp):
    groups = {"dp": [], "pp": [], "tp": []}
    for p in range(pp):
        for t in range(tp):
            groups["dp"].append([global_rank(d, p, t, dp, pp, tp) for d in range(dp)])
    for d in range(dp):
        for t in range(tp):
            groups["pp"].append([global_rank(d, p, t, dp, pp, tp) for p in range(pp)])
    for d in range(dp):
        for p in range(pp):
            groups["tp"].append([global_rank(d, p, t, dp, pp, tp) for t in range(tp)])
    return groups
"""
COORDS = "return rank // (pp * tp), rank // tp % pp, rank % tp"
RANK = "return (dp_rank * pp + pp_rank) * tp + tp_rank"
DP_GROUP = 'groups["dp"].append([global_rank(d, p, t, dp, pp, tp) for d in range(dp)])'
TP_GROUP = 'groups["tp"].append([global_rank(d, p, t, dp, pp, tp) for t in range(tp)])'
RETURN = "    return groups\n"


def edit(*pairs: str) -> str:
    """GOOD with each (old, new) pair replaced; every old text must be there."""
    src = GOOD
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert old in src, old
        src = src.replace(old, new)
    return src


# The whole solution on the layout arange(world).view(tp, pp, dp): consistent, but dp innermost.
DP_INNERMOST = edit(
    COORDS, "return rank % dp, rank // dp % pp, rank // (dp * pp)",
    RANK, "return (tp_rank * pp + pp_rank) * dp + dp_rank",
)  # fmt: skip

# name -> (source, key words of the hint), each checked as data in this process
WRONG = {
    "dp_innermost": (DP_INNERMOST,
                     r"^rank 1 of a \(dp, pp, tp\) = \(2, 2, 2\) grid should be \(0, 0, 1\), got "
                     r"\(1, 0, 0\): these are the coordinates of the layout arange\(world\)\."
                     r"view\(tp, pp, dp\) \(dp innermost\): the course's layout is .*tp varies "
                     r"fastest"),
    "pp_and_tp_swapped": (edit(COORDS, "return rank // (pp * tp), rank % pp, rank // pp % tp"),
                          r"^rank 1 of a \(dp, pp, tp\) = \(2, 2, 2\) grid should be \(0, 0, 1\), "
                          r"got \(0, 1, 0\): .*view\(dp, tp, pp\) \(pp innermost\)"),
    "counts_from_one": (edit(COORDS, "return rank // (pp * tp) + 1, rank // tp % pp + 1, "
                                     "rank % tp + 1"),
                        r"^rank 0 of a \(dp, pp, tp\) = \(1, 1, 1\) grid should be \(0, 0, 0\), "
                        r"got \(1, 1, 1\): coordinates count from 0"),
    "coordinates_out_of_range": (edit(COORDS, "return rank // (pp * tp), rank // tp, rank % tp"),
                                 r"^rank 1 of a \(dp, pp, tp\) = \(4, 1, 1\) grid should be "
                                 r"\(1, 0, 0\), got \(1, 1, 0\): pp_rank 1 of rank 1 is outside "
                                 r"0\.\.0 \(pp=1\)"),
    # pp_rank times pp instead of tp: right while pp == tp, so 2x2x2 alone would not show it
    "global_rank_not_the_inverse": (edit(RANK, "return dp_rank * pp * tp + pp_rank * pp + tp_rank"),
                                    r"^global_rank\(0, 1, 0, 1, 4, 1\) should be 1, got 4: it is "
                                    r"not the inverse of grid_coordinates, which gives \(0, 1, 0\) "
                                    r"for rank 1"),
    "global_rank_dp_innermost": (edit(RANK, "return (tp_rank * pp + pp_rank) * dp + dp_rank"),
                                 r"^global_rank\(0, 0, 1, 2, 2, 2\) should be 1, got 4: .*these "
                                 r"are the ranks of the layout arange\(world\)\.view\(tp, pp, "
                                 r"dp\)"),
    # the groups off by one: range(1, tp + 1)
    "groups_off_by_one": (edit(TP_GROUP, TP_GROUP.replace("range(tp)", "range(1, tp + 1)")),
                          r"^the tp groups of a \(dp, pp, tp\) = \(1, 1, 1\) grid name rank 1 "
                          r"\(in \[1\]\), but the ranks are 0\.\.0"),
    "tp_groups_are_the_pp_groups": (edit(
        'groups["pp"]', 'groups["tmp"]', 'groups["tp"]', 'groups["pp"]', 'groups["tmp"]',
        'groups["tp"]', '{"dp": [], "pp": [], "tp": []}', '{"dp": [], "pp": [], "tp": [], '
        '"tmp": []}', RETURN, '    del groups["tmp"]\n' + RETURN,
    ), r"^the pp group of rank 0 in a \(dp, pp, tp\) = \(1, 4, 1\) grid should be \[0, 1, 2, 3\], "
       r"got \[0\]: these are the dp groups, and the tp groups too on this grid; the pp group "
       r"of rank r is grid\[d, :, t\]"),
    # dp groups with stride tp instead of pp * tp: they overlap, and miss the last ranks
    "rank_in_two_groups": (edit(DP_GROUP, 'groups["dp"].append([p * tp + t + k * tp for k in '
                                          'range(dp)])'),
                           r"^the dp groups of a \(dp, pp, tp\) = \(2, 2, 2\) grid: rank 2 appears "
                           r"in two dp groups, \[0, 2\] and \[2, 4\]: the dp groups split the 8 "
                           r"ranks, each rank in exactly one"),
    # the last replica's pp groups never made: range(dp - 1)
    "missing_groups": (edit('    for d in range(dp):\n        for t in range(tp):\n',
                            '    for d in range(dp - 1):\n        for t in range(tp):\n'),
                       r"^the pp groups of a \(dp, pp, tp\) = \(1, 1, 1\) grid miss rank 0 \(got "
                       r"no group, expected dp \* tp = 1\): return every group of the axis$"),
    "an_empty_group": (edit(RETURN, '    groups["pp"].append([])\n' + RETURN),
                       r"^the pp groups of a \(dp, pp, tp\) = \(1, 1, 1\) grid: a group is empty "
                       r"\(\[\]\); each holds pp=1 ranks"),
    "group_listed_twice": (edit(RETURN, '    groups["tp"].append(groups["tp"][0])\n' + RETURN),
                           r"^the tp groups of a \(dp, pp, tp\) = \(1, 1, 1\) grid: the group "
                           r"\[0\] is listed twice"),
    "a_rank_twice_in_a_group": (edit(RETURN, '    groups["dp"][0] *= 2\n' + RETURN),
                                r"^the dp groups of a .* = \(1, 1, 1\) grid: the group \[0, 0\] "
                                r"lists rank 0 twice"),
    "descending_group": (edit(DP_GROUP, DP_GROUP.replace("range(dp)", "reversed(range(dp))")),
                         r"^the dp groups of a \(dp, pp, tp\) = \(4, 1, 1\) grid: the group "
                         r"\[3, 2, 1, 0\] is not ascending; list it as \[0, 1, 2, 3\]: "
                         r"dist\.new_group numbers its members by increasing global rank"),
    "axis_as_a_set": (edit(RETURN, "    return {axis: {tuple(g) for g in gs} for axis, gs in "
                                   "groups.items()}\n"),
                      r"^axis_groups\(1, 1, 1\)\['dp'\] is a set: return a list of groups\. A set "
                      r"has no order that every rank is promised to share"),
    "groups_as_sets": (edit(RETURN, "    return {axis: [set(g) for g in gs] for axis, gs in "
                                    "groups.items()}\n"),
                       r"^a group of axis_groups\(1, 1, 1\)\['dp'\] is a set \(\[0\]\): a set has "
                       r"no order; return each group as a list of its ranks, ascending"),
    "one_flat_list": (edit(RETURN, "    return {axis: gs[0] for axis, gs in groups.items()}\n"),
                      r"^axis_groups\(1, 1, 1\)\['dp'\] is one flat list of ranks, \[0\]: return "
                      r"every group of the axis, a list of lists"),
    "missing_key": (edit(RETURN, '    del groups["pp"]\n' + RETURN),
                    r"^axis_groups\(1, 1, 1\) has the keys \['dp', 'tp'\], expected exactly 'dp', "
                    r"'pp' and 'tp'"),
    "two_coordinates": (edit(COORDS, "return divmod(rank, pp * tp)"),
                r"^grid_coordinates\(0, 1, 1, 1\) returned \(0, 0\): return a tuple of three ints"),
    "raises": (edit(RANK, "return [dp_rank, pp_rank, tp_rank].index(-1)"),
               r"^global_rank\(0, 0, 0, 1, 1, 1\) raised ValueError: -1 is not in list"),
    "library_by_name": ("from types import SimpleNamespace\n\nfrom course_lib.topology import "
                        "Topology\n\n" + edit(COORDS, "return Topology.coordinates(SimpleNamespace("
                                               "pp=pp, tp=tp, world_size=dp * pp * tp), rank)"),
                        r"course_lib\.topology\.Topology is not allowed in this exercise: write "
                        r"the mapping and the groups yourself"),
    # the class looked up through its module at call time, its method on a stand-in self
    "library_through_its_module": (edit(COORDS, "return topology.Topology.coordinates("
                                                "SimpleNamespace(pp=pp, tp=tp, world_size=dp * "
                                                "pp * tp), rank)") +
                         "\nfrom types import SimpleNamespace\n\nfrom course_lib import topology\n",
                         r"Topology is not allowed in this exercise"),
}  # fmt: skip

# The same answer on rank 0 as on one process, but each rank puts its own group first:
# right as data, different lists on different ranks (a deadlock in new_group, unchecked).
OWN_GROUP_FIRST = edit(
    RETURN,
    "    import torch.distributed as dist\n\n"
    "    me = dist.get_rank() if dist.is_initialized() else 0\n"
    "    return {axis: sorted(gs, key=lambda g: me not in g) for axis, gs in groups.items()}\n",
)
# Only this rank's group of each axis, from dist.get_rank(): needs a process group.
ONLY_THIS_RANKS = """\
import torch.distributed as dist


def grid_coordinates(rank, dp, pp, tp):
    return rank // (pp * tp), rank // tp % pp, rank % tp


def global_rank(dp_rank, pp_rank, tp_rank, dp, pp, tp):
    return (dp_rank * pp + pp_rank) * tp + tp_rank


def axis_groups(dp, pp, tp):
    d, p, t = grid_coordinates(dist.get_rank(), dp, pp, tp)
    return {
        "dp": [[global_rank(i, p, t, dp, pp, tp) for i in range(dp)]],
        "pp": [[global_rank(d, i, t, dp, pp, tp) for i in range(pp)]],
        "tp": [[global_rank(d, p, i, dp, pp, tp) for i in range(tp)]],
    }
"""

VALID = {
    "solution": GOOD,
    # torch, as Topology does it: the grid, its coordinates found by search, movedim
    "torch_movedim": """\
import torch

AXES = ("dp", "pp", "tp")


def grid_coordinates(rank, dp, pp, tp):
    grid = torch.arange(dp * pp * tp).view(dp, pp, tp)
    return tuple((grid == rank).nonzero()[0])  # three 0-d integer tensors


def global_rank(dp_rank, pp_rank, tp_rank, dp, pp, tp):
    return torch.arange(dp * pp * tp).view(dp, pp, tp)[dp_rank, pp_rank, tp_rank]


def axis_groups(dp, pp, tp):
    grid = torch.arange(dp * pp * tp).view(dp, pp, tp)  # (dp, pp, tp)
    return {
        axis: grid.movedim(dim, -1).reshape(-1, grid.shape[dim]).tolist()
        for dim, axis in enumerate(AXES)
    }
""",
    # numpy: unravel_index / ravel_multi_index, and arrays for groups (rows of an array)
    "numpy": """\
import numpy as np


def grid_coordinates(rank, dp, pp, tp):
    return np.unravel_index(rank, (dp, pp, tp))


def global_rank(dp_rank, pp_rank, tp_rank, dp, pp, tp):
    return np.ravel_multi_index((dp_rank, pp_rank, tp_rank), (dp, pp, tp))


def axis_groups(dp, pp, tp):
    grid = np.arange(dp * pp * tp).reshape(dp, pp, tp)
    sizes = {"dp": dp, "pp": pp, "tp": tp}
    return {
        axis: np.moveaxis(grid, dim, -1).reshape(-1, sizes[axis])
        for dim, axis in enumerate(sizes)
    }
""",
    # torchtitan-like swapdims: the dp groups in another order, the same on every rank
    "swapdims_order": """\
import torch


def grid_coordinates(rank, dp, pp, tp):
    dp_rank, rest = divmod(rank, pp * tp)
    pp_rank, tp_rank = divmod(rest, tp)
    return (dp_rank, pp_rank, tp_rank)


def global_rank(dp_rank, pp_rank, tp_rank, dp, pp, tp):
    return dp_rank * pp * tp + pp_rank * tp + tp_rank


def axis_groups(dp, pp, tp):
    mesh = torch.arange(dp * pp * tp).view(dp, pp, tp)
    return {
        name: mesh.swapdims(-1, dim).reshape(-1, mesh.size(dim)).tolist()
        for dim, name in enumerate(["dp", "pp", "tp"])
    }
""",
    # a loop over the ranks, bucketing each by its other two coordinates, then sorted
    "loop_sorted": """\
def grid_coordinates(rank, dp, pp, tp):
    return (rank // (pp * tp), (rank // tp) % pp, rank % tp)


def global_rank(dp_rank, pp_rank, tp_rank, dp, pp, tp):
    return dp_rank * (pp * tp) + pp_rank * tp + tp_rank


def axis_groups(dp, pp, tp):
    buckets = {"dp": {}, "pp": {}, "tp": {}}
    for rank in range(dp * pp * tp):
        d, p, t = grid_coordinates(rank, dp, pp, tp)
        buckets["dp"].setdefault((p, t), set()).add(rank)
        buckets["pp"].setdefault((d, t), set()).add(rank)
        buckets["tp"].setdefault((d, p), set()).add(rank)
    return {axis: sorted(sorted(g) for g in b.values()) for axis, b in buckets.items()}
""",
}

NOT_YET = '    raise NotImplementedError("Your code here: replace this line with your solution.")\n'
STUB = f"""\
def grid_coordinates(rank, dp, pp, tp):
{NOT_YET}

def global_rank(dp_rank, pp_rank, tp_rank, dp, pp, tp):
{NOT_YET}

def axis_groups(dp, pp, tp):
{NOT_YET}"""

LIVE = ((2, 1, 2), (1, 2, 2), (2, 2, 1))  # world 4 in the tests; the notebook's is world 8
# By hand from the three grids: rank r's all-reduced global rank over its dp, pp and tp group,
# per shape of LIVE. E.g. (2, 1, 2) is [[[0, 1]], [[2, 3]]]: rank 0's dp group is [0, 2] (sum
# 2), its pp group [0] (0), its tp group [0, 1] (1).
LIVE_SUMS = [
    [[2, 0, 1], [0, 2, 1], [2, 1, 0]],
    [[4, 1, 1], [1, 4, 1], [4, 1, 1]],
    [[2, 2, 5], [2, 2, 5], [2, 5, 2]],
    [[4, 3, 5], [3, 4, 5], [4, 5, 3]],
]


def _write(tmp_path, monkeypatch, source: str, name: str = "my_grid") -> None:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.chdir(tmp_path)


def _check_in_process(tmp_path, monkeypatch, source: str) -> None:
    """Stage 1 in this process: the function the grader's spawned rank runs."""
    _write(tmp_path, monkeypatch, source)
    grader.check_functions(grader._functions(grader._load_fresh("my_grid"), "my_grid"))


@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_attempt_gets_its_hint(tmp_path, monkeypatch, name):
    source, hint = WRONG[name]
    assert source != GOOD
    with pytest.raises(AssertionError, match=hint):
        _check_in_process(tmp_path, monkeypatch, source)


@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_variant_passes_as_data(tmp_path, monkeypatch, name):
    _check_in_process(tmp_path, monkeypatch, VALID[name])


@pytest.mark.timeout(120)
def test_valid_variants_pass_live(tmp_path, monkeypatch):
    """Every valid variant's groups created and all-reduced over on 4 real ranks, one spawn."""
    names = sorted(VALID)
    for name in names:
        _write(tmp_path, monkeypatch, VALID[name], f"my_{name}")
    ((case, results),) = core.grade(
        W.live_every_variant, [Case(4)], str(tmp_path), [f"my_{n}" for n in names], LIVE,
        timeout_s=90, what=grader.WHAT, module_name="my_", hang_hint=grader.HANG_HINT,
    )  # fmt: skip
    for rank, per_variant in enumerate(results):
        assert per_variant == [LIVE_SUMS[rank]] * len(names), (rank, names)


@pytest.mark.timeout(120)
def test_the_solution_passes_the_grader(tmp_path, monkeypatch, capsys):
    # stage 1 only: the live stage ran above, and at world 8 in the solution notebook
    _write(tmp_path, monkeypatch, GOOD)
    grader.grade_grid("my_grid", live_shapes=())
    out = capsys.readouterr().out
    assert out.startswith("OK: my_grid.grid_coordinates and global_rank are inverse")
    assert "for all 11 shapes from (1, 1, 1) to (2, 3, 4)." in out and "Live" not in out


@pytest.mark.timeout(120)
def test_groups_that_differ_between_ranks_fail_live_with_both_lists(tmp_path, monkeypatch):
    _write(tmp_path, monkeypatch, OWN_GROUP_FIRST)
    grader.check_functions(grader._functions(grader._load_fresh("my_grid"), "my_grid"))  # passes
    hint = (
        r"^axis_groups\(2, 1, 2\) differs between ranks: rank 0 got the dp groups "
        r"\[\[0, 2\], \[1, 3\]\], rank 1 got \[\[1, 3\], \[0, 2\]\]: axis_groups must return "
        r"the same groups in the same order on every rank"
    )
    with pytest.raises(AssertionError, match=hint):
        grader.grade_grid("my_grid", live_shapes=LIVE, timeout_s=60)


@pytest.mark.timeout(120)
def test_only_this_ranks_groups_fail_on_a_real_rank(tmp_path, monkeypatch):
    _write(tmp_path, monkeypatch, ONLY_THIS_RANKS)
    hint = (
        r"^the pp groups of a \(dp, pp, tp\) = \(4, 1, 1\) grid miss ranks 1, 2, 3 \(got 1 group, "
        r"expected dp \* tp = 4\): return every group of the axis, not only this rank's; every "
        r"rank calls dist\.new_group for every group"
    )
    with pytest.raises(AssertionError, match=hint):
        grader.grade_grid("my_grid", live_shapes=())


@pytest.mark.timeout(120)
def test_endless_loop_becomes_the_hang_hint(tmp_path, monkeypatch):
    _write(tmp_path, monkeypatch, edit(COORDS, "while True:\n        pass"))
    with pytest.raises(AssertionError, match=r"the run hung.*does every loop of your functions"):
        grader.grade_grid("my_grid", timeout_s=5)


@pytest.mark.timeout(120)
def test_stub_is_not_implemented(tmp_path, monkeypatch):
    _write(tmp_path, monkeypatch, STUB)
    with pytest.raises(NotImplementedError, match="the grid mapping is not implemented yet"):
        grader.grade_grid("my_grid")


def test_live_shapes_of_different_worlds_are_refused_before_spawning():
    with pytest.raises(ValueError, match=r"must all have the same dp \* pp \* tp"):
        grader.grade_grid("my_grid", live_shapes=((2, 1, 2), (2, 2, 2)))


def test_topology_is_refused_by_name_and_by_alias_and_restored():
    alias = T.Topology  # taken before the guard, as another module may hold it
    with grader._guarded():
        with pytest.raises(core.ForbiddenCall, match="Topology is not allowed"):
            T.Topology(1, 1, 1)
        with pytest.raises(core.ForbiddenCall, match="Topology is not allowed"):
            alias.single()  # its code, however it is reached
    assert T.Topology is alias and T.Topology.single().world_size == 1


def test_try_grid_prints_one_line_per_rank(tmp_path, monkeypatch, capsys):
    _write(tmp_path, monkeypatch, GOOD)
    grader.try_grid("my_grid", 2, 2, 2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "(dp, pp, tp) = (2, 2, 2), 8 ranks"
    assert lines[-3].split() == ["5", "(1,", "0,", "1)", "5", "[1,", "5]", "[5,", "7]", "[4,", "5]"]


def test_solution_notebook_states_the_contract_and_shows_the_grader_ok():
    path = Path(__file__).resolve().parent.parent / "solutions" / "07_3d_parallelism.ipynb"
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "arange(world).view(dp, pp, tp)" in text and "same order" in text
    code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "rank // (pp * tp)" not in code.split("%%writefile")[0]  # no answer before it
    graders = [c for c in cells if "grader" in c["metadata"].get("tags", [])]
    assert len(graders) == 1 and 'grade_grid("my_grid")' in "".join(graders[0]["source"])
    shown = "".join("".join(o.get("text", "")) for o in graders[0]["outputs"])
    assert "OK: my_grid.grid_coordinates and global_rank are inverse" in shown
    assert "Live on 8 ranks" in shown
