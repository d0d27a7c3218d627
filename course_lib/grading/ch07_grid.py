"""Chapter 7's grader: the learner's rank-to-grid mapping and the groups of each axis.

The learner writes, in a module of their own (``%%writefile my_grid.py``), the two pieces
every 3D framework starts with (Megatron-LM's ``parallel_state``, torchtitan's
``DeviceMesh``), on the course's layout ``torch.arange(world).view(dp, pp, tp)`` (tp
innermost, dp outermost; :class:`course_lib.topology.Topology` is the answer key):

- ``grid_coordinates(rank, dp, pp, tp) -> (dp_rank, pp_rank, tp_rank)`` and its inverse
  ``global_rank(dp_rank, pp_rank, tp_rank, dp, pp, tp) -> rank``;
- ``axis_groups(dp, pp, tp) -> {"dp": [[ranks], ...], "pp": [...], "tp": [...]}``: every
  group of each axis, each group's ranks ascending (group rank i is the i-th smallest, as
  ``dist.new_group`` numbers them). The groups of an axis may come in any order, as long
  as it is the same on every rank: it may depend on (dp, pp, tp) only.

Two stages, each in spawned ranks (an endless loop ends at a deadline, as a hint):

1. **As data** (one rank): for every shape of :data:`SHAPES` (1-sized axes, 2x2x2, 3x2x2,
   2x4x2, 2x3x4), every rank's coordinates, every coordinate's rank, then each axis's
   groups: ranks in range, none twice, each rank in exactly one group, every group there,
   each rank's group the right one, each group ascending. A hint names the shape, the rank
   and the axis, and recognises the usual mistakes (another axis innermost, counting from
   1, another axis's groups, only this rank's groups, a set where order matters).
2. **Live** (8 ranks, :data:`LIVE_SHAPES`): every rank calls ``axis_groups``; the ranks
   first compare their answers (one ``all_gather_object``), so groups that differ between
   ranks fail with the two lists instead of deadlocking inside ``new_group``; then every
   rank creates every group with ``dist.new_group`` in the learner's order, all-reduces
   its global rank over its own dp, pp and tp group and compares the sum with the
   expected one, and checks that its rank in each group is its coordinate on that axis.

``course_lib.topology.Topology`` is ruled out while the learner's code runs, by name and
by its methods' code objects (however they were reached).
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist

from course_lib import topology as T
from course_lib.grading.core import Case, ForbiddenCall, grade, import_learner

WHAT = "the grid mapping"
AXES = ("dp", "pp", "tp")  # slowest varying first: the layout arange(world).view(dp, pp, tp)
FUNCTIONS = {
    "grid_coordinates": "grid_coordinates(rank, dp, pp, tp)",
    "global_rank": "global_rank(dp_rank, pp_rank, tp_rank, dp, pp, tp)",
    "axis_groups": "axis_groups(dp, pp, tp)",
}
# (dp, pp, tp) checked as data: 1-sized axes first, then 8 = 2x2x2, 12 = 3x2x2, 16 = 2x4x2
# and 24 = 2x3x4, where no two axes have the same size (a swap of two axes shows).
SHAPES = (
    (1, 1, 1), (4, 1, 1), (1, 4, 1), (1, 1, 4), (2, 2, 2), (1, 2, 2), (2, 1, 2), (2, 2, 1),
    (3, 2, 2), (2, 4, 2), (2, 3, 4),
)  # fmt: skip
# The live run: 8 ranks, four grids of them (each one creates all its groups).
LIVE_SHAPES = ((2, 2, 2), (1, 2, 4), (4, 1, 2), (2, 4, 1))
LIVE_TIMEOUT_S = 120.0  # 8 ranks on 2 cores: ~10 s quiet, several times that when loaded
FORBIDDEN = "course_lib.topology.Topology"
ALLOWED = (
    "write the mapping and the groups yourself (plain arithmetic, torch or numpy); the "
    "library's Topology is the answer key"
)
HANG_HINT = (
    "does every loop of your functions end? If they return, check that axis_groups depends "
    "only on (dp, pp, tp): every rank calls dist.new_group for every group, in the order "
    "axis_groups gives, and ranks that create different groups wait for each other forever"
)
# Where each axis's group lies on grid = arange(world).view(dp, pp, tp).
AXIS_RULE = {
    "dp": "grid[:, p, t]: the ranks pp * tp apart that share pp_rank and tp_rank",
    "pp": "grid[d, :, t]: the ranks tp apart that share dp_rank and tp_rank",
    "tp": "grid[d, p, :]: tp neighbouring ranks that share dp_rank and pp_rank",
}
GROUP_COUNT = {"dp": "pp * tp", "pp": "dp * tp", "tp": "dp * pp"}
LAYOUT_RULE = (
    "the course's layout is arange(world).view(dp, pp, tp): tp varies fastest (rank and "
    "rank + 1 are in one tp group, the neighbours of one node's NVLink), then pp, and dp "
    "slowest"
)


# ----------------------------------------------------------------------------------------
# The answer key, and the layouts a mistake may follow


def _world(shape: Sequence[int]) -> int:
    return shape[0] * shape[1] * shape[2]


def _coords(rank: int, shape: Sequence[int], order: Sequence[int] = (0, 1, 2)) -> tuple:
    """(dp_rank, pp_rank, tp_rank) of ``rank`` when the axes nest as ``order`` (slowest first).

    ``order=(0, 1, 2)`` is the course's layout; another permutation is a wrong one, e.g.
    ``(2, 1, 0)`` = ``arange(world).view(tp, pp, dp)``, dp innermost.
    """
    coords = [0, 0, 0]
    for axis in reversed(order):  # the innermost axis varies fastest
        coords[axis] = rank % shape[axis]
        rank //= shape[axis]
    return tuple(coords)


def _layout(order: Sequence[int]) -> str:
    names = [AXES[i] for i in order]
    return f"arange(world).view({', '.join(names)}) ({names[-1]} innermost)"


WRONG_ORDERS = [o for o in itertools.permutations(range(3)) if o != (0, 1, 2)]


def _groups(shape: Sequence[int], order: Sequence[int] = (0, 1, 2)) -> dict[str, list[list[int]]]:
    """Every group of each axis: the ranks that differ only in that axis's coordinate.

    Groups ascending by their smallest rank, ranks ascending: the order Topology creates.
    """
    out: dict[str, dict[tuple, list[int]]] = {axis: {} for axis in AXES}
    for rank in range(_world(shape)):
        c = _coords(rank, shape, order)
        for a, axis in enumerate(AXES):
            out[axis].setdefault(c[:a] + c[a + 1 :], []).append(rank)
    return {axis: sorted(groups.values()) for axis, groups in out.items()}


def _as_sets(groups: list[list[int]]) -> set[frozenset[int]]:
    return {frozenset(g) for g in groups}


def _shape_text(shape: Sequence[int]) -> str:
    return f"({shape[0]}, {shape[1]}, {shape[2]})"


# ----------------------------------------------------------------------------------------
# The answer key, ruled out


class _Refused:
    """Stands for ``Topology`` while the learner's code runs: any use is refused."""

    message = f"{FORBIDDEN} is not allowed in this exercise: {ALLOWED}"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise ForbiddenCall(self.message)

    def __getattr__(self, name: str) -> Any:
        raise ForbiddenCall(self.message)

    def __mro_entries__(self, bases: tuple) -> tuple:  # `class Mine(Topology)`
        raise ForbiddenCall(self.message)


# Topology's methods' code objects, taken at import (before any guard replaces the name).
_CODES = {
    getattr(value, "__func__", value).__code__
    for value in vars(T.Topology).values()
    if hasattr(getattr(value, "__func__", value), "__code__")
}


@contextlib.contextmanager
def _guarded() -> Iterator[None]:
    """The learner's code runs here: ``Topology`` refused by name and by its code objects."""

    def guard(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in _CODES:
            raise ForbiddenCall(_Refused.message)

    saved, previous = T.Topology, sys.getprofile()
    T.Topology = _Refused()  # type: ignore[misc, assignment]
    sys.setprofile(guard)
    try:
        yield
    finally:
        sys.setprofile(previous)
        T.Topology = saved  # type: ignore[misc]


def _functions(module: ModuleType, module_name: str) -> dict[str, Callable[..., Any]]:
    """The learner's three functions, by name; a missing one is named with its signature."""
    found = {}
    for name, signature in FUNCTIONS.items():
        fn = getattr(module, name, None)
        if isinstance(fn, _Refused):
            raise ForbiddenCall(fn.message)
        if not callable(fn):
            raise AssertionError(f"{module_name}.py defines no function {signature}")
        found[name] = fn
    return found


def _learner(cwd: str, module_name: str) -> dict[str, Callable[..., Any]]:
    """On a rank: the learner's module imported under the guard, its three functions."""
    with _guarded():  # a top-level `from course_lib.topology import Topology` too
        module = import_learner(cwd, module_name)
    return _functions(module, module_name)


def _call(fn: Callable[..., Any], *args: int) -> Any:
    """``fn(*args)`` under the guard; an error of the learner's code names the call."""
    try:
        with _guarded():
            return fn(*args)
    except (NotImplementedError, ForbiddenCall):
        raise
    except Exception as err:
        shown = ", ".join(map(str, args))
        raise AssertionError(f"{fn.__name__}({shown}) raised {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------------------
# Plain values from what the learner returned


def _int(value: Any, what: str) -> int:
    """An int from an int-like value (int, numpy or 0-d torch integer); else a hint."""
    if isinstance(value, bool):
        raise AssertionError(f"{what} is {value!r}, a bool: return integers")
    try:
        return value.__index__()
    except (AttributeError, TypeError, RuntimeError):
        raise AssertionError(
            f"{what} is {value!r} ({type(value).__name__}), not an integer"
        ) from None


def _coordinates_of(value: Any, call: str) -> tuple[int, int, int]:
    if isinstance(value, torch.Tensor) or hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list | tuple) or len(value) != 3:
        raise AssertionError(
            f"{call} returned {value!r}: return a tuple of three ints, (dp_rank, pp_rank, tp_rank)"
        )
    return tuple(_int(v, f"{call}[{i}]") for i, v in enumerate(value))  # type: ignore[return-value]


def _is_scalar(value: Any) -> bool:
    """An int, or a 0-d torch or numpy value: a rank, where a group was expected."""
    return isinstance(value, int) or getattr(value, "ndim", None) == 0


def _group_list(value: Any, where: str) -> list[int]:
    """One group as a list of ints; a set (no order) or a non-sequence is refused."""
    if isinstance(value, set | frozenset):
        raise AssertionError(
            f"{where} is a set ({sorted(value)}): a set has no order; return each group as "
            "a list of its ranks, ascending (group rank i is the i-th smallest global rank)"
        )
    if hasattr(value, "tolist") and not isinstance(value, list):  # a torch or numpy row
        value = value.tolist()
    if not isinstance(value, list | tuple | range):
        raise AssertionError(
            f"{where} is {value!r} ({type(value).__name__}): each group is a list of ranks"
        )
    return [_int(v, f"a rank in {where}") for v in value]


def _axis_list(value: Any, where: str) -> list[list[int]]:
    """One axis's groups as a list of lists of ints; a set, a flat list or a scalar refused."""
    if isinstance(value, set | frozenset):
        raise AssertionError(
            f"{where} is a set: return a list of groups. A set has no order that every "
            "rank is promised to share, and every rank must call dist.new_group for the "
            "groups in the same order"
        )
    if hasattr(value, "tolist") and not isinstance(value, list):  # a tensor or array
        value = value.tolist()
    if not isinstance(value, list | tuple):
        raise AssertionError(
            f"{where} is {value!r} ({type(value).__name__}): return a list of groups, "
            "each a list of ranks"
        )
    if value and all(_is_scalar(v) for v in value):
        raise AssertionError(
            f"{where} is one flat list of ranks, {list(value)}: return every group of the "
            f"axis, a list of lists ([[0, ...], [...], ...]), not only this rank's group"
        )
    return [_group_list(g, f"a group of {where}") for g in value]


def _groups_of(result: Any, shape: Sequence[int]) -> dict[str, list[list[int]]]:
    """``axis_groups``'s answer as ``{axis: [[ranks], ...]}`` of plain ints, or a hint."""
    call = f"axis_groups{_shape_text(shape)}"
    if not isinstance(result, Mapping):
        raise AssertionError(
            f"{call} returned a {type(result).__name__}, expected a dict "
            "{'dp': [[ranks], ...], 'pp': [...], 'tp': [...]}"
        )
    if set(result) != set(AXES):
        raise AssertionError(
            f"{call} has the keys {sorted(map(str, result))}, expected exactly 'dp', 'pp' and 'tp'"
        )
    return {axis: _axis_list(result[axis], f"{call}[{axis!r}]") for axis in AXES}


# ----------------------------------------------------------------------------------------
# Stage 1: the functions as data


def _diagnose_coordinates(got: dict[int, tuple], shape: Sequence[int]) -> str:
    """What the learner's whole map of ``shape`` looks like: a wrong layout, 1-based, ..."""
    world = _world(shape)
    for order in WRONG_ORDERS:
        if all(got[r] == _coords(r, shape, order) for r in range(world)):
            if all(_coords(r, shape, order) == _coords(r, shape) for r in range(world)):
                continue
            return f"these are the coordinates of the layout {_layout(order)}: {LAYOUT_RULE}"
    if all(got[r] == tuple(c + 1 for c in _coords(r, shape)) for r in range(world)):
        return "coordinates count from 0: rank 0 is (0, 0, 0), the last rank (dp-1, pp-1, tp-1)"
    for r in range(world):
        for a, axis in enumerate(AXES):
            if not 0 <= got[r][a] < shape[a]:
                return (
                    f"{axis}_rank {got[r][a]} of rank {r} is outside 0..{shape[a] - 1} "
                    f"({axis}={shape[a]})"
                )
    return (
        "rank r sits at the indices (d, p, t) with grid[d, p, t] == r on grid = "
        "arange(world).view(dp, pp, tp): tp is the innermost axis, dp the outermost"
    )


def _check_coordinates(fn: Callable[..., Any], shape: Sequence[int]) -> None:
    world, s = _world(shape), _shape_text(shape)
    got = {}
    for r in range(world):
        call = f"grid_coordinates({r}, {', '.join(map(str, shape))})"
        got[r] = _coordinates_of(_call(fn, r, *shape), call)
    for r in range(world):
        if got[r] != _coords(r, shape):
            raise AssertionError(
                f"rank {r} of a (dp, pp, tp) = {s} grid should be {_coords(r, shape)}, got "
                f"{got[r]}: {_diagnose_coordinates(got, shape)}"
            )


def _check_global_rank(fn: Callable[..., Any], shape: Sequence[int]) -> None:
    world, sizes = _world(shape), ", ".join(map(str, shape))
    got = {}
    for r in range(world):
        c = _coords(r, shape)
        call = f"global_rank({', '.join(map(str, c))}, {sizes})"
        got[r] = _int(_call(fn, *c, *shape), f"{call}'s result")
    for r in range(world):
        if got[r] == r:
            continue
        c = ", ".join(map(str, _coords(r, shape)))
        hint = "rank = (dp_rank * pp + pp_rank) * tp + tp_rank on arange(world).view(dp, pp, tp)"
        for order in WRONG_ORDERS:
            wrong = {_coords(q, shape, order): q for q in range(world)}
            if all(got[q] == wrong[_coords(q, shape)] for q in range(world)):
                hint = f"these are the ranks of the layout {_layout(order)}: {LAYOUT_RULE}"
                break
        else:
            if all(got[q] == q + 1 for q in range(world)):
                hint = "ranks count from 0: global_rank(0, 0, 0, ...) is 0"
        raise AssertionError(
            f"global_rank({c}, {sizes}) should be {r}, got {got[r]}: it is not the inverse of "
            f"grid_coordinates, which gives ({c}) for rank {r} of a (dp, pp, tp) = "
            f"{_shape_text(shape)} grid; {hint}"
        )


def _diagnose_groups(axis: str, groups: list[list[int]], shape: Sequence[int]) -> str:
    have, right = _as_sets(groups), _groups(shape)
    others = [o for o in AXES if o != axis and have == _as_sets(right[o])]
    if others:
        too = f", and the {others[1]} groups too on this grid" if len(others) > 1 else ""
        return (
            f"these are the {others[0]} groups{too}; the {axis} group of rank r is "
            f"{AXIS_RULE[axis]}"
        )
    for order in WRONG_ORDERS:
        if have == _as_sets(_groups(shape, order)[axis]):
            return f"these are the {axis} groups of the layout {_layout(order)}: {LAYOUT_RULE}"
    return f"the {axis} group of the rank at (d, p, t) is {AXIS_RULE[axis]}"


def _missing(axis: str, groups: list[list[int]], missing: list[int], shape: Sequence[int]) -> str:
    """The hint for ranks that no group of ``axis`` holds."""
    world, want_count = _world(shape), _world(shape) // shape[AXES.index(axis)]
    where = f"the {axis} groups of a (dp, pp, tp) = {_shape_text(shape)} grid"
    text = f"{where} miss rank{'s' * (len(missing) > 1)} {', '.join(map(str, missing))}"
    if len(groups) >= want_count:
        return f"{text}: each of the {world} ranks belongs to one {axis} group"
    got = {0: "no group", 1: "1 group"}.get(len(groups), f"{len(groups)} groups")
    text += (
        f" (got {got}, expected {GROUP_COUNT[axis]} = {want_count}): return every group of the axis"
    )
    if len(groups) == 1:  # this rank's group alone, most likely
        text += (
            ", not only this rank's; every rank calls dist.new_group for every group, even "
            "those it is not in"
        )
    return text


def _partition(axis: str, groups: list[list[int]], shape: Sequence[int]) -> dict[int, list[int]]:
    """Each rank's group, once the groups name valid ranks and hold each rank exactly once."""
    world = _world(shape)
    where = f"the {axis} groups of a (dp, pp, tp) = {_shape_text(shape)} grid"
    for g in groups:
        if not g:
            size = shape[AXES.index(axis)]
            raise AssertionError(f"{where}: a group is empty ([]); each holds {axis}={size} ranks")
        bad = [r for r in g if not 0 <= r < world]
        if bad:
            raise AssertionError(
                f"{where} name rank {bad[0]} (in {g}), but the ranks are 0..{world - 1}"
            )
        twice = sorted({r for r in g if g.count(r) > 1})
        if twice:
            raise AssertionError(f"{where}: the group {g} lists rank {twice[0]} twice")
    seen: dict[int, list[int]] = {}
    for g in groups:
        for r in g:
            if r in seen and sorted(seen[r]) == sorted(g):
                raise AssertionError(f"{where}: the group {g} is listed twice")
            if r in seen:
                raise AssertionError(
                    f"{where}: rank {r} appears in two {axis} groups, {seen[r]} and {g}: the "
                    f"{axis} groups split the {world} ranks, each rank in exactly one; "
                    f"{_diagnose_groups(axis, groups, shape)}"
                )
            seen[r] = g
    missing = [r for r in range(world) if r not in seen]
    if missing:
        raise AssertionError(_missing(axis, groups, missing, shape))
    return seen


def _check_axis(axis: str, groups: list[list[int]], shape: Sequence[int]) -> None:
    """One axis's groups: a partition of the ranks into the right groups, each ascending."""
    s = _shape_text(shape)
    seen = _partition(axis, groups, shape)
    expected = _groups(shape)[axis]
    for r in range(_world(shape)):
        want = next(g for g in expected if r in g)
        if sorted(seen[r]) != want:
            raise AssertionError(
                f"the {axis} group of rank {r} in a (dp, pp, tp) = {s} grid should be {want}, "
                f"got {seen[r]}: {_diagnose_groups(axis, groups, shape)}"
            )
    for g in groups:
        if g != sorted(g):
            raise AssertionError(
                f"the {axis} groups of a (dp, pp, tp) = {s} grid: the group {g} is not "
                f"ascending; list it as {sorted(g)}: dist.new_group numbers its members by "
                "increasing global rank, so group rank i is the i-th rank of the list only when "
                "the list is sorted"
            )


def check_groups(groups: dict[str, list[list[int]]], shape: Sequence[int]) -> None:
    """Chapter 7's grader: ``axis_groups``'s normalised answer for ``shape``, axis by axis."""
    for axis in AXES:
        _check_axis(axis, groups[axis], shape)


def check_functions(
    fns: Mapping[str, Callable[..., Any]], shapes: Sequence[Sequence[int]] = SHAPES
) -> None:
    """Chapter 7's grader, stage 1: the three functions as data on every shape of ``shapes``.

    All shapes' coordinates first, then all shapes' ranks, then all shapes' groups: the
    first hint is about the first function that is wrong, on the smallest shape that shows
    it. Raises AssertionError with the hint (NotImplementedError for the stub).
    """
    for shape in shapes:
        _check_coordinates(fns["grid_coordinates"], shape)
    for shape in shapes:
        _check_global_rank(fns["global_rank"], shape)
    for shape in shapes:
        check_groups(_groups_of(_call(fns["axis_groups"], *shape), shape), shape)


def _pure_worker(ctx, case: Case, group, cwd: str, module_name: str) -> int:
    """On one rank: :func:`check_functions` on every shape of SHAPES."""
    torch.set_num_threads(1)
    check_functions(_learner(cwd, module_name))
    return len(SHAPES)


# ----------------------------------------------------------------------------------------
# Stage 2: the groups on real ranks


def _check_same_everywhere(groups: dict[str, list[list[int]]], shape: Sequence[int]) -> None:
    """Raise on every rank unless every rank's ``axis_groups`` answer equals rank 0's."""
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, groups)
    for rank, theirs in enumerate(everyone):
        for axis in AXES:
            if theirs[axis] != everyone[0][axis]:
                raise AssertionError(
                    f"axis_groups{_shape_text(shape)} differs between ranks: rank 0 got the "
                    f"{axis} groups {everyone[0][axis]}, rank {rank} got {theirs[axis]}: "
                    "axis_groups must return the same groups in the same order on every rank "
                    "(depend only on dp, pp and tp, never on this rank): every rank calls "
                    "dist.new_group for each group in that order, and ranks that create "
                    "different groups wait for each other forever"
                )


def _live_shape(fns: Mapping[str, Callable[..., Any]], shape: Sequence[int]) -> list[int]:
    """Every group created in the learner's order; this rank's sum over each of its groups."""
    rank = dist.get_rank()
    groups = _groups_of(_call(fns["axis_groups"], *shape), shape)
    _check_same_everywhere(groups, shape)  # before new_group: a mismatch would hang there
    check_groups(groups, shape)  # the same lists everywhere: every rank passes or fails
    coords = _coordinates_of(
        _call(fns["grid_coordinates"], rank, *shape), f"grid_coordinates({rank}, ...)"
    )
    sums = []
    for a, axis in enumerate(AXES):
        mine = None
        for members in groups[axis]:  # every rank, every group, the same order
            created = dist.new_group(members)
            if rank in members:
                mine = (members, created)
        members, created = mine  # check_groups: this rank is in exactly one
        t = torch.tensor([rank])
        dist.all_reduce(t, group=created)
        want = sum(next(g for g in _groups(shape)[axis] if rank in g))
        where = f"live, (dp, pp, tp) = {_shape_text(shape)}, rank {rank}"
        if int(t) != want:
            raise AssertionError(
                f"{where}: the all-reduce of the global rank over its {axis} group {members} "
                f"gave {int(t)}, expected {want}"
            )
        if dist.get_rank(created) != coords[a]:
            raise AssertionError(
                f"{where}: its rank in its {axis} group {members} is "
                f"{dist.get_rank(created)}, but grid_coordinates gives {axis}_rank {coords[a]}"
            )
        sums.append(int(t))
    return sums


def _live_worker(ctx, case: Case, group, cwd: str, module_name: str, shapes) -> list[list[int]]:
    """On each rank: :func:`_live_shape` for every shape (each fills the whole world)."""
    torch.set_num_threads(1)
    fns = _learner(cwd, module_name)
    return [_live_shape(fns, shape) for shape in shapes]


# ----------------------------------------------------------------------------------------
# The grader, and a quick look for the notebook


def _one_rank_message(err: AssertionError) -> AssertionError:
    """Stage 1 runs on one rank: its ``rank 0: on 1 ranks:`` prefix says nothing."""
    return AssertionError(re.sub(r"^rank 0: on 1 ranks: (AssertionError: )?", "", str(err)))


def _live_message(err: AssertionError) -> AssertionError:
    return AssertionError(re.sub(r"^rank \d+: on \d+ ranks: (AssertionError: )?", "", str(err)))


def grade_grid(
    module_name: str = "my_grid",
    *,
    live_shapes: Sequence[Sequence[int]] = LIVE_SHAPES,
    timeout_s: float = LIVE_TIMEOUT_S,
) -> None:
    """Chapter 7's graded exercise: ``module_name``'s grid mapping and groups of each axis.

    First :func:`check_functions` on one spawned rank, every shape of :data:`SHAPES`; then,
    unless ``live_shapes`` is empty, one run on ``dp * pp * tp`` ranks (8 by default)
    where every rank creates every group of each shape with ``dist.new_group`` in the
    learner's order and all-reduces its rank over its own groups. ``timeout_s`` is each
    spawn's hard deadline. Prints OK, or raises AssertionError naming the shape, the rank
    and the axis (NotImplementedError for the stub).
    """
    shapes = [tuple(s) for s in live_shapes]
    worlds = {_world(s) for s in shapes}
    if len(worlds) > 1:
        raise ValueError(f"live_shapes {shapes} must all have the same dp * pp * tp")
    cwd = os.getcwd()
    common = {"what": WHAT, "module_name": module_name, "hang_hint": HANG_HINT}
    try:
        grade(_pure_worker, [Case(1)], cwd, module_name, timeout_s=timeout_s, **common)
    except AssertionError as err:
        raise _one_rank_message(err) from None
    live = ""
    if shapes:
        world = worlds.pop()
        try:
            grade(_live_worker, [Case(world)], cwd, module_name, shapes, timeout_s=timeout_s,
                  **common)  # fmt: skip
        except AssertionError as err:
            raise _live_message(err) from None
        live = (
            f" Live on {world} ranks: axis_groups the same on every rank, every group created "
            f"with dist.new_group in its order, and each rank's all-reduce over its dp, pp "
            f"and tp group gives the expected sum, for (dp, pp, tp) = "
            f"{', '.join(map(_shape_text, shapes))}."
        )
    print(
        f"OK: {module_name}.grid_coordinates and global_rank are inverse on the layout "
        f"arange(world).view(dp, pp, tp), and axis_groups gives every group of each axis "
        f"(each ascending), for all {len(SHAPES)} shapes from (1, 1, 1) to (2, 3, 4).{live}"
    )


def _load_fresh(module_name: str) -> ModuleType:
    """The learner's ``module_name.py`` from the working directory, read now (no cache)."""
    path = Path(os.getcwd()) / f"{module_name}.py"
    spec = importlib.util.spec_from_file_location(f"_{module_name}_fresh", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise FileNotFoundError(f"no {path.name} here: run the %%writefile cell first")
    module = importlib.util.module_from_spec(spec)
    with _guarded():
        spec.loader.exec_module(module)
    return module


def _cell(value: Any) -> str:
    return str(value) if not isinstance(value, list) else "[" + ", ".join(map(str, value)) + "]"


def try_grid(module_name: str = "my_grid", dp: int = 2, pp: int = 2, tp: int = 2) -> None:
    """Chapter 7's exercise: print the learner's grid for one shape, one line per rank.

    In this process, nothing spawned and nothing asserted (that is :func:`grade_grid`'s
    job): each rank's ``grid_coordinates``, ``global_rank`` of those coordinates, and the
    group of each axis that contains it (``-`` when none does). The stub raises
    NotImplementedError.
    """
    fns = _functions(_load_fresh(module_name), module_name)
    with _guarded():
        groups = fns["axis_groups"](dp, pp, tp)
    rows = [("rank", "(dp, pp, tp)", "global_rank", "dp group", "pp group", "tp group")]
    for r in range(dp * pp * tp):
        with _guarded():
            c = fns["grid_coordinates"](r, dp, pp, tp)
            back = fns["global_rank"](*c, dp, pp, tp)
        found = []
        for axis in AXES:
            holding = [list(g) for g in groups.get(axis, []) if r in list(g)]
            found.append(_cell(holding[0]) if len(holding) == 1 else f"{len(holding)} groups")
        rows.append((str(r), str(tuple(c)), str(back), *found))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"(dp, pp, tp) = ({dp}, {pp}, {tp}), {dp * pp * tp} ranks")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
