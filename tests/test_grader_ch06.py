"""Chapter 6's grader, run directly on attempts at RowParallelLinear: wrong ones get their hint.

Each attempt is a ``my_row_parallel.py`` written into a temporary folder; the grader
imports it from the working directory, as it does from the notebook's folder. The
attempts are the reference solution with one small edit (or written whole), each with the
key words its hint must contain. A spawn costs seconds, so the wrong attempts are graded
on 2 ranks (or on the subgroup where the subgroup is the point); the valid variants must
pass every case of DEFAULT_CASES.
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from course_lib.grading import ch06_tensor as grader
from course_lib.grading import core
from course_lib.grading.core import Case

# The solution (solutions/06_tensor_parallel.ipynb).
GOOD = """\
import torch
import torch.distributed as dist
from torch import nn


class ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class RowParallelLinear(nn.Module):
    def __init__(self, weight, bias, group):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.group = group

    @classmethod
    def from_linear(cls, linear, group=None):
        n, r = dist.get_world_size(group), dist.get_rank(group)
        if linear.in_features % n:
            raise ValueError(f"in_features={linear.in_features} is not divisible by N={n}")
        k = linear.in_features // n
        weight = linear.weight.detach()[:, r * k : (r + 1) * k].clone()
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(weight, bias, group)

    def forward(self, x_shard):
        partial = x_shard @ self.weight.T
        y = ReduceFromTensorParallel.apply(partial, self.group)
        return y if self.bias is None else y + self.bias
"""
ALL_REDUCE = "        dist.all_reduce(out, group=group)\n"
RETURN_OUT = "        return out\n"
APPLY = "y = ReduceFromTensorParallel.apply(partial, self.group)"
RANK = "n, r = dist.get_world_size(group), dist.get_rank(group)"
COLUMNS = "weight = linear.weight.detach()[:, r * k : (r + 1) * k].clone()"
RAISE = "            raise ValueError("


def edit(*pairs: str) -> str:
    """GOOD with each (old, new) pair replaced; every old text must be there."""
    src = GOOD
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert old in src, old
        src = src.replace(old, new)
    return src


# name -> (source, key words of the hint), graded on 2 ranks
WRONG = {
    "no_all_reduce": (edit(ALL_REDUCE, ""),
                      r"output differs .*no all-reduce: this rank's partial product "
                      r"x_shard @ weight\.T: g's forward must all-reduce"),
    "bias_before_all_reduce": (edit(
        "partial = x_shard @ self.weight.T",
        "partial = x_shard @ self.weight.T + self.bias if self.bias is not None else "
        "x_shard @ self.weight.T",
        "return y if self.bias is None else y + self.bias", "return y",
    ), r"nn\.Linear\(12, 5\), group rank \d of N=2: the output differs .*bias added N times: "
       r"add the bias once, after the all-reduce"),
    # torch's differentiable all-reduce: its backward all-reduces the gradient again
    "all_reduce_in_backward": (edit(
        APPLY, "y = dist_nn.all_reduce(partial, group=self.group)",
        "from torch import nn\n", "import torch.distributed.nn.functional as dist_nn\n"
                                  "from torch import nn\n",
    ), r"x_shard\.grad differs .*all-reduce in backward: g's backward is the identity: the "
       r"output gradient is already the same on every rank.*multiplies it by N"),
    "row_slice": (edit(COLUMNS, "weight = linear.weight.detach().chunk(n, dim=0)[r].clone()"),
                  r"layer\.weight has shape \(\d, 12\), expected \(out_features, in_features "
                  r"// N\) = \(5, 6\): row slice instead of column slice.*COLUMNS"),
    "reversed_ranks": (edit(RANK, "n = dist.get_world_size(group)\n"
                                  "        r = n - 1 - dist.get_rank(group)"),
                       r"another rank's slice: these are group rank \d's columns"),
    "mean_instead_of_sum": (edit(RETURN_OUT, "        return out / dist.get_world_size(group)\n"),
                            r"output differs .*mean instead of sum: g's forward is an "
                            r"all-reduce SUM"),
    "library_layer": ("from course_lib.parallel.tensor_parallel import ("
                      "ReduceFromTensorParallel, RowParallelLinear)\n",
                      r"tensor_parallel\.RowParallelLinear is not allowed in this exercise: "
                      r"write RowParallelLinear and ReduceFromTensorParallel yourself"),
    "library_operator": (edit(
        "        out = x.clone()\n" + ALL_REDUCE + RETURN_OUT,
        "        return tp.reduce_from_tensor_parallel(x, group)\n",
        "from torch import nn\n",
        "from torch import nn\n\nfrom course_lib.parallel import tensor_parallel as tp\n",
    ), r"tensor_parallel\.reduce_from_tensor_parallel is not allowed in this exercise"),
    # the layer keeps the whole reference and computes with its columns: right numbers,
    # but every rank holds the full weight
    "keeps_the_reference": (edit(
        "        return cls(weight, bias, group)\n",
        "        layer = cls(weight, bias, group)\n        layer.full = linear\n"
        "        layer.cols = slice(r * k, (r + 1) * k)\n        return layer\n",
        "partial = x_shard @ self.weight.T",
        "partial = x_shard @ self.full.weight[:, self.cols].T.detach() + 0 * self.weight.sum()",
    ), r"layer\.full\.weight \(shape \(5, 12\)\) holds 60 elements: a rank keeps only its "
       r"columns.*do not keep the reference layer"),
    "weight_view_not_copied": (edit(COLUMNS, COLUMNS.replace(".clone()", "")),
                               r"layer\.weight \(shape \(5, 6\)\) is a view of a tensor of 60 "
                               r"elements.*\.clone\(\) the columns you slice"),
    "no_value_error": (edit("        if linear.in_features % n:\n" + RAISE,
                            "        if False:\n" + RAISE),
                       r"from_linear\(nn\.Linear\(13, 5\), group\) with N=2 returned a layer: "
                       r"raise ValueError"),
}  # fmt: skip

# Right on a whole world: a subgroup tells them apart, global ranks (1, 2) of 3 (the
# cheapest); the grader's own subgroups fail them the same way.
SUBGROUP = {
    "global_rank": (edit(RANK, "n, r = dist.get_world_size(group), dist.get_rank()"),
                    r"subgroup of global ranks \(1, 2\).*global rank on a subgroup.*use "
                    r"dist\.get_rank\(group\)"),
    # the members all-reduce over the whole world: rank 0 never joins, they wait
    "group_none": (edit(ALL_REDUCE, "        dist.all_reduce(out)\n"),
                   r"waited more than 5 s.*subgroup of global ranks \(1, 2\).*all-reduce "
                   r"over group.*group=None means the whole world"),
}  # fmt: skip

VALID = {
    "solution": GOOD,
    # chapter 1's ring, torch.matmul, tensor_split, register_parameter for a missing bias,
    # the bias added with torch.add
    "ring_matmul": """\
import torch
import torch.distributed as dist
from torch import nn

from course_lib.collectives import ring_all_reduce


class ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return ring_all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class RowParallelLinear(nn.Module):
    @classmethod
    def from_linear(cls, linear, group):
        n = dist.get_world_size(group)
        if linear.in_features % n != 0:
            raise ValueError(
                f"N={n} ranks do not divide in_features={linear.in_features}; choose N among "
                f"{[d for d in range(1, linear.in_features + 1) if linear.in_features % d == 0]}"
            )
        layer = cls()
        with torch.no_grad():
            mine = torch.tensor_split(linear.weight, n, dim=1)[dist.get_rank(group)]
            layer.weight = nn.Parameter(mine.clone())
            if linear.bias is None:
                layer.register_parameter("bias", None)
            else:
                layer.bias = nn.Parameter(linear.bias.clone())
        layer.group = group
        return layer

    def forward(self, x_shard):
        y = ReduceFromTensorParallel.apply(torch.matmul(x_shard, self.weight.t()), self.group)
        if self.bias is not None:
            y = torch.add(y, self.bias)
        return y
""",
    # Megatron's own g: the all-reduce in place on its input (the partial product, which
    # nobody else holds); F.linear; the bias through F.linear's bias-free call, then added
    "megatron_in_place": edit(
        "        out = x.clone()\n" + ALL_REDUCE + RETURN_OUT,
        "        dist.all_reduce(x, group=group)\n        return x\n",
        "partial = x_shard @ self.weight.T", "partial = F.linear(x_shard, self.weight)",
        "from torch import nn\n", "import torch.nn.functional as F\nfrom torch import nn\n",
    ),
}  # fmt: skip

NOT_YET = (
    '        raise NotImplementedError("Your code here: replace this line with your solution.")\n'
)
STUB = f"""\
import torch
import torch.distributed as dist
from torch import nn


class ReduceFromTensorParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
{NOT_YET}
    @staticmethod
    def backward(ctx, grad):
{NOT_YET}

class RowParallelLinear(nn.Module):
    def __init__(self, weight, bias, group):
        super().__init__()
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)
        self.group = group

    @classmethod
    def from_linear(cls, linear, group=None):
{NOT_YET}
    def forward(self, x_shard):
{NOT_YET}"""


def _library_present() -> bool:
    return grader._library() is not None


def _grade(tmp_path, monkeypatch, source: str, **kwargs) -> None:
    (tmp_path / "my_row_parallel.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    grader.grade_row_parallel("my_row_parallel", **kwargs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_attempt_gets_its_hint(tmp_path, monkeypatch, name):
    source, hint = WRONG[name]
    if name.startswith("library_") and not _library_present():
        pytest.skip(f"{grader.LIBRARY} does not exist yet")
    assert source != GOOD
    with pytest.raises(AssertionError, match=hint):
        _grade(tmp_path, monkeypatch, source, cases=[Case(2)])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(SUBGROUP))
def test_world_for_group_mistake_fails_on_a_subgroup(tmp_path, monkeypatch, name):
    source, hint = SUBGROUP[name]
    monkeypatch.setattr(core, "HANG_S", 5.0)  # group_none deadlocks: the hint comes sooner
    with pytest.raises(AssertionError, match=hint):
        _grade(tmp_path, monkeypatch, source, cases=[Case(3, (1, 2))])


def valid_worker(ctx, case, group, cwd, names):
    """Every valid variant in one spawn per world size: a spawn costs seconds."""
    return [grader._row_worker(ctx, case, group, cwd, name) for name in names]


@pytest.mark.timeout(120)
def test_valid_variants_pass_every_case(tmp_path, monkeypatch):
    names = sorted(VALID)
    for name in names:
        (tmp_path / f"my_{name}.py").write_text(VALID[name])
    monkeypatch.chdir(tmp_path)
    modules = [f"my_{name}" for name in names]
    monkeypatch.setattr(core, "HANG_S", 30.0)  # three variants per spawn: slower than one
    ran = core.grade(valid_worker, core.DEFAULT_CASES, str(tmp_path), modules, timeout_s=90,
                     what=grader.WHAT, module_name="my_", hang_hint=grader.HANG_HINT)  # fmt: skip
    assert [case for case, _ in ran] == list(core.DEFAULT_CASES)
    for case, results in ran:
        for i in range(len(names)):
            grader._check_equal(case, [outputs[i] for outputs in results])


@pytest.mark.timeout(120)
def test_the_solution_passes_the_grader(tmp_path, monkeypatch, capsys):
    _grade(tmp_path, monkeypatch, GOOD, cases=[Case(3, (0, 2))])
    out = capsys.readouterr().out
    assert "OK: my_row_parallel.RowParallelLinear matches nn.Linear(12, 5)" in out
    assert "on the subgroup of global ranks (0, 2) of 3" in out


@pytest.mark.timeout(120)
def test_stub_is_not_implemented(tmp_path, monkeypatch):
    with pytest.raises(NotImplementedError, match="the row-parallel layer is not implemented yet"):
        _grade(tmp_path, monkeypatch, STUB, world_size=2)


def test_the_library_is_refused_by_name_and_by_alias():
    # In this process, no spawn: the guard the grader puts around the learner's code.
    library = grader._library()
    if library is None:
        pytest.skip(f"{grader.LIBRARY} does not exist yet")
    alias = library.RowParallelLinear  # taken before the guard, as another module may hold it
    with grader._guarded():
        with pytest.raises(core.ForbiddenCall, match="RowParallelLinear is not allowed"):
            library.RowParallelLinear.from_linear(nn.Linear(4, 2), None)
        with pytest.raises(core.ForbiddenCall, match="RowParallelLinear is not allowed"):

            class Mine(library.RowParallelLinear):  # a subclass
                pass

        with pytest.raises(core.ForbiddenCall, match="RowParallelLinear is not allowed"):
            alias.from_linear(nn.Linear(4, 2), None)  # its code, however it is reached
        with pytest.raises(core.ForbiddenCall, match="reduce_from_tensor_parallel is not"):
            library.reduce_from_tensor_parallel(torch.ones(2), None)
    assert library.RowParallelLinear is alias  # restored


def test_solution_notebook_writes_the_good_solution_and_shows_the_grader_ok():
    path = Path(__file__).resolve().parent.parent / "solutions" / "06_tensor_parallel.ipynb"
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    graders = [c for c in cells if "grader" in c["metadata"].get("tags", [])]
    assert len(graders) == 1 and 'grade_row_parallel("my_row_parallel")' in "".join(
        graders[0]["source"]
    )
    shown = "".join("".join(o.get("text", "")) for o in graders[0]["outputs"])
    assert "OK: my_row_parallel.RowParallelLinear matches nn.Linear(12, 5)" in shown
    assert "subgroup of global ranks (0, 2)" in shown
