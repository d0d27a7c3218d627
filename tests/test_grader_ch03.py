"""Chapter 3's grader, run directly on attempts at the ZeRO-1 step: wrong ones get their hint.

Each attempt is a ``my_zero.py`` written into a temporary folder; the grader imports it
from the working directory, as it does from the notebook's folder. The attempts are the
reference solution with one small edit (or written whole), each with the key words its
hint must contain; the valid variants must pass every case.
"""

import json
from pathlib import Path

import pytest

from course_lib.grading import ch03_zero as grader
from course_lib.grading import core
from course_lib.grading.core import Case

# The solution (solutions/03_zero.ipynb, as course_lib/parallel/zero.py has it).
GOOD = """\
from course_lib import collectives as C


def reduce_scatter_gradients(zero):
    for fg in zero.flat_groups:
        piece = C.ring_reduce_scatter(fg.grad_flat, zero.group, zero.counter)
        fg.shard.grad = piece.div_(zero.world_size)


def step_and_all_gather(zero):
    zero.optimizer.step()
    for fg in zero.flat_groups:
        C.ring_all_gather(fg.flat, zero.group, zero.counter)
"""
REDUCE = "piece = C.ring_reduce_scatter(fg.grad_flat, zero.group, zero.counter)"
DIVIDE = "fg.shard.grad = piece.div_(zero.world_size)"
STEP = "    zero.optimizer.step()\n"
GATHER = "        C.ring_all_gather(fg.flat, zero.group, zero.counter)\n"


def edit(*pairs: str) -> str:
    """GOOD with each (old, new) pair replaced; every old text must be there."""
    src = GOOD
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert old in src, old
        src = src.replace(old, new)
    return src


# name -> (source, key words of the hint). Items 7, 9 and 11 of issue 13, then more.
WRONG = {
    # 7: skipping the all-gather reaches "did every rank all-gather?"
    "no_all_gather": (edit(GATHER, "        pass\n"), r"still hold their values from before "
                      r"the step: did every rank all-gather\?"),
    # 7: torch's collectives are ruled out, with what to use instead
    "torch_reduce_scatter": (edit(
        REDUCE,
        "piece = torch.empty_like(fg.layout.shard(fg.grad_flat))\n"
        "        dist.reduce_scatter_tensor(piece, fg.grad_flat, group=zero.group)",
        "from course_lib import collectives as C\n",
        "import torch\nimport torch.distributed as dist\n\n"
        "from course_lib import collectives as C\n",
    ), r"dist\.reduce_scatter_tensor is not allowed.*C\.ring_reduce_scatter.*zero\.counter"),
    "torch_all_gather_imported": (edit(
        GATHER,
        "        all_gather_into_tensor(fg.flat, fg.layout.shard(fg.flat).clone(), "
        "group=zero.group)\n",
        "from course_lib import collectives as C\n",
        "from torch.distributed import all_gather_into_tensor\n\n"
        "from course_lib import collectives as C\n",
    ), r"dist\.all_gather_into_tensor is not allowed.*C\.ring_all_gather"),
    # more typical mistakes
    "no_division": (edit(DIVIDE, "fg.shard.grad = piece"),
                    r"sum over the N = 2 ranks, not the mean: divide"),
    "all_reduce_for_reduce_scatter": (edit(
        REDUCE,
        "C.ring_all_reduce(fg.grad_flat, zero.group, zero.counter)\n"
        "        piece = fg.layout.shard(fg.grad_flat)",
    ), r"reduce_scatter_gradients sent .* an all-reduce in place of the reduce-scatter"),
    "all_gather_before_step": (edit(STEP, "").replace(GATHER, GATHER + STEP),
                               r"from before the step.*after zero\.optimizer\.step\(\), "
                               r"not before"),
    "only_first_group_reduced": (edit(
        "    for fg in zero.flat_groups:\n        piece",
        "    for fg in zero.flat_groups[:1]:\n        piece",
    ), r"flat group 1 of 2 \(hidden\.bias, out\.bias\).*fg\.shard\.grad is None"),
    "only_first_group_gathered": (edit(
        "    for fg in zero.flat_groups:\n        C.ring_all_gather",
        "    for fg in zero.flat_groups[:1]:\n        C.ring_all_gather",
    ), r"flat group 1 of 2.*did every rank all-gather\?"),
    "uncounted": (edit("zero.counter)", "None)"), r"nothing was counted: pass zero\.counter"),
    "no_step": (edit(STEP, ""), r"did not move"),
}  # fmt: skip

# Right on a whole world; a subgroup (zero.group is not the world) tells them apart, so they
# are graded on a subgroup alone, global ranks (1, 2) of 3 (the cheapest): after the whole
# worlds of ZERO_CASES, which they pass, the grader's subgroups fail them the same way.
SUBGROUP = {
    "world_size_of_the_world": (edit(
        "piece.div_(zero.world_size)", "piece.div_(dist.get_world_size())",
        "from course_lib import collectives as C\n",
        "import torch.distributed as dist\n\nfrom course_lib import collectives as C\n",
    ), r"subgroup.*divided by 3, the size of the whole world.*zero\.world_size"),
    # 9: a deadlock (members wait for a rank outside the subgroup) becomes the hang hint
    "group_none": (edit(GATHER, GATHER.replace("zero.group", "None")),
                   r"group=None means the whole world"),
}  # fmt: skip

VALID = {
    "solution": GOOD,
    # a while loop over the groups, a new tensor for the gradient (not in place), keyword
    # arguments, a clone reduced and a clone gathered then copied back under no_grad, the
    # flat groups gathered in reverse order
    "variant": """\
import torch

from course_lib import collectives as C


def reduce_scatter_gradients(zero):
    n = zero.world_size
    i = 0
    while i < len(zero.flat_groups):
        fg = zero.flat_groups[i]
        buf = fg.grad_flat.clone()
        piece = C.ring_reduce_scatter(buf, group=zero.group, counter=zero.counter)
        fg.shard.grad = piece / n
        i += 1


def step_and_all_gather(zero):
    zero.optimizer.step()
    with torch.no_grad():
        for fg in reversed(zero.flat_groups):
            full = fg.flat.clone()
            C.ring_all_gather(tensor=full, group=zero.group, counter=zero.counter)
            fg.flat.copy_(full)
""",
}

STUB = """\
def reduce_scatter_gradients(zero):
    raise NotImplementedError("Your code here: replace this line with your solution.")


def step_and_all_gather(zero):
    raise NotImplementedError("Your code here: replace this line with your solution.")
"""


def _grade(tmp_path, monkeypatch, source: str, **kwargs) -> None:
    (tmp_path / "my_zero.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    grader.grade_zero1_step("my_zero", **kwargs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_attempt_gets_its_hint(tmp_path, monkeypatch, name):
    source, hint = WRONG[name]
    assert source != GOOD
    with pytest.raises(AssertionError, match=hint):
        _grade(tmp_path, monkeypatch, source)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(SUBGROUP))
def test_world_for_group_mistake_fails_on_a_subgroup(tmp_path, monkeypatch, name):
    source, hint = SUBGROUP[name]
    monkeypatch.setattr(core, "HANG_S", 5.0)  # group_none deadlocks: the hint comes sooner
    with pytest.raises(AssertionError, match=hint):
        _grade(tmp_path, monkeypatch, source, cases=[Case(3, (1, 2))])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(VALID))
def test_valid_variant_passes(tmp_path, monkeypatch, capsys, name):
    _grade(tmp_path, monkeypatch, VALID[name])
    out = capsys.readouterr().out
    assert "OK: my_zero inside ZeroRedundancyOptimizer matches single-device sgd and adamw" in out
    assert "subgroup of global ranks (1, 2, 3)" in out


@pytest.mark.timeout(120)
def test_the_library_passes_its_own_grader(monkeypatch, capsys):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the exercise is the library's code
    grader.grade_zero1_step("course_lib.parallel.zero", world_size=3, steps=2)
    assert "OK: course_lib.parallel.zero" in capsys.readouterr().out


@pytest.mark.timeout(120)
def test_stub_is_not_implemented(tmp_path, monkeypatch):
    with pytest.raises(NotImplementedError, match="the ZeRO-1 step is not implemented yet"):
        _grade(tmp_path, monkeypatch, STUB)


@pytest.mark.timeout(120)
def test_adamw_alone_still_names_a_missing_division(tmp_path, monkeypatch):
    # AdamW barely notices a missing 1/N in its update; the gradient check still does.
    source, _ = WRONG["no_division"]
    with pytest.raises(AssertionError, match=r"adamw, step 1.*sum over the N = 2 ranks"):
        _grade(tmp_path, monkeypatch, source, optim="adamw", cases=[Case(2)])


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="choose among"):
        grader.grade_zero1_step("my_zero", optim="lamb")


def test_solution_notebook_states_the_contract_and_shows_the_grader_ok():
    # Issue 13, item 11: the instructions say what the optimizer reads and why no_grad;
    # the stored grader output shows OK.
    path = Path(__file__).resolve().parent.parent / "solutions" / "03_zero.ipynb"
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "`fg.shard.grad = piece / N`" in text and "torch.no_grad()" in text
    graders = [c for c in cells if "grader" in c["metadata"].get("tags", [])]
    shown = "".join("".join(o.get("text", "")) for c in graders for o in c["outputs"])
    assert "OK: my_zero inside ZeroRedundancyOptimizer" in shown
