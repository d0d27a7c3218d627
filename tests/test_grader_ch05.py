"""Chapter 5's grader, run directly on attempts at 1F1B: wrong ones get their hint.

Each attempt is a ``my_schedule.py`` written into a temporary folder; the grader imports it
from the working directory, as it does from the notebook's folder. The attempts are the
reference solution with one small edit (or written whole), each with the key words its
hint must contain; the valid variants must pass. Wrong attempts fail in the grader's first
stage (the schedule as data, one spawned rank), so they skip the executor (``runs=()``);
the reference runs on real ranks too.
"""

import json
from pathlib import Path

import pytest

from course_lib.grading import ch05_pipeline as grader

# The solution (solutions/05_pipeline_schedules.ipynb).
GOOD = """\
from course_lib.parallel.schedules import Action


def one_f_one_b(stages, microbatches):
    if microbatches < stages:
        raise ValueError(f"1F1B needs m >= p micro-batches, got m={microbatches} < p={stages}")
    schedule = []
    for rank in range(stages):
        warmup = stages - rank - 1
        actions = [Action("F", i) for i in range(warmup)]
        for i in range(microbatches - warmup):
            actions += [Action("F", warmup + i), Action("B", i)]
        actions += [Action("B", i) for i in range(microbatches - warmup, microbatches)]
        schedule.append(actions)
    return schedule
"""
WARMUP = "warmup = stages - rank - 1"
STEADY = 'actions += [Action("F", warmup + i), Action("B", i)]'
SWAPPED = 'actions += [Action("B", i), Action("F", warmup + i)]'  # B before its F
COOLDOWN = (
    '        actions += [Action("B", i) for i in range(microbatches - warmup, microbatches)]\n'
)
CHECK = (
    "    if microbatches < stages:\n"
    '        raise ValueError(f"1F1B needs m >= p micro-batches, got m={microbatches} < '
    'p={stages}")\n'
)


def edit(*pairs: str) -> str:
    """GOOD with each (old, new) pair replaced; every old text must be there."""
    src = GOOD
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert old in src, old
        src = src.replace(old, new)
    return src


GPIPE = """\
from course_lib.parallel.schedules import gpipe


def one_f_one_b(stages, microbatches):
    if microbatches < stages:
        raise ValueError("need m >= p")
    return gpipe(stages, microbatches)
"""

# GPipe on the first call in a process when p > 1, 1F1B after: the grader's first stage
# calls it with p = 1 first, so it passes there; each executor rank is a fresh process that
# calls it once with p = 2, and that call's schedule is checked again on the rank.
GPIPE_ON_FIRST_CALL = edit(
    "    schedule = []\n",
    "    CALLS.append(stages)\n"
    "    if len(CALLS) == 1 and stages > 1:\n"
    "        return gpipe(stages, microbatches)\n"
    "    schedule = []\n",
    "from course_lib.parallel.schedules import Action\n",
    "from course_lib.parallel.schedules import Action, gpipe\n\nCALLS = []\n",
)

# name -> (source, key words of the hint)
WRONG = {
    "gpipe": (GPIPE, r"p=2, m=2: rank 1 holds the activations of 2 micro-batches at once; "
                     r"1F1B holds at most p - r = 1.*like GPipe.*warm-up of p - r - 1"),
    # at m = 2 the extra forward makes rank 1 GPipe-like: the peak names it
    "warmup_off_by_one": (edit(WARMUP, "warmup = stages - rank"),
                          r"p=2, m=2: rank 1 holds the activations of 2 micro-batches at once; "
                          r"1F1B holds at most p - r = 1 there"),
    # valid, little memory, but the pipeline never fills: the bubble names it
    "no_warmup": (edit(WARMUP, "warmup = 0"),
                  r"p=2, m=2: with equal stages .* the bubble is 0.500, but 1F1B's is GPipe's, "
                  r"\(p - 1\) / \(m \+ p - 1\) = 0.333.*Rank 0 runs 1 forwards before its "
                  r"first backward \(1F1B: p - r = 2"),
    "no_cooldown": (edit(COOLDOWN, ""), r"p=2, m=2: rank 0 never runs B1.*cool-down"),
    "backward_before_forward": (edit(STEADY, SWAPPED),
                                r"p=1, m=1: rank 0 runs B0 \(position 0\) before F0"),
    # the warm-up counted from the wrong end: rank 0 waits for a gradient while rank 1 waits
    # for the next activation, which rank 0 sends only after that gradient
    "warmup_reversed_deadlock": (edit(WARMUP, "warmup = rank"),
                                 r"p=2, m=2: deadlock: rank 0 waits at B0 for the gradient of "
                                 r"micro-batch 0 from rank 1.*rank 1 waits at F1"),
    "microbatch_off_by_one": (edit("range(microbatches - warmup, microbatches)",
                                   "range(microbatches - warmup, microbatches + 1)"),
                              r"p=1, m=1: rank 0, position 2: B1 has micro-batch 1, but there "
                              r"are m=1"),
    "flat_list": (edit("schedule.append(actions)", "schedule.extend(actions)"),
                  r"p=1, m=1: returned one flat list of 2 actions; return one list per rank"),
    "library_imported": ("""\
from course_lib.parallel.schedules import one_f_one_b as library


def one_f_one_b(stages, microbatches):
    return library(stages, microbatches)
""", r"schedules\.one_f_one_b is not allowed in this exercise: write the schedule yourself"),
    # an alias the names guard cannot see: caught by its code object
    "library_alias": ("""\
from course_lib.parallel.pipeline_strategy import SCHEDULES


def one_f_one_b(stages, microbatches):
    return SCHEDULES["1f1b"](stages, microbatches)
""", r"schedules\.one_f_one_b is not allowed in this exercise"),
    "no_value_error": (edit(CHECK, ""), r"p=2, m=1: returned a schedule: .*raise ValueError"),
}  # fmt: skip

VALID = {
    "solution": GOOD,
    # rules, not a formula: forward while fewer than p - r micro-batches are alive, else
    # backward; a while loop; rows as tuples; its own ValueError message
    "rules": """\
from course_lib.parallel.schedules import Action


def one_f_one_b(stages, microbatches):
    if microbatches < stages:
        raise ValueError(f"too few micro-batches: {microbatches} for {stages} stages")
    schedule = []
    for rank in range(stages):
        row, done_f, done_b = [], 0, 0
        while done_b < microbatches:
            if done_f < microbatches and done_f - done_b < stages - rank:
                row.append(Action("F", done_f))
                done_f += 1
            else:
                row.append(Action("B", done_b))
                done_b += 1
        schedule.append(tuple(row))
    return schedule
""",
}

STUB = """\
from course_lib.parallel.schedules import Action


def one_f_one_b(stages, microbatches):
    raise NotImplementedError("Your code here: replace this line with your solution.")
"""

ENDLESS = edit(
    "for i in range(microbatches - warmup):", "i = 0\n        while i < microbatches - warmup:"
)


def _grade(tmp_path, monkeypatch, source: str, **kwargs) -> None:
    (tmp_path / "my_schedule.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    grader.grade_one_f_one_b("my_schedule", "one_f_one_b", **kwargs)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(WRONG))
def test_wrong_attempt_gets_its_hint(tmp_path, monkeypatch, name):
    source, hint = WRONG[name]
    assert source != GOOD
    with pytest.raises(AssertionError, match=hint):
        _grade(tmp_path, monkeypatch, source, runs=())


@pytest.mark.timeout(120)
def test_a_schedule_that_changes_after_the_first_stage_is_caught_on_the_ranks(
    tmp_path, monkeypatch
):
    with pytest.raises(AssertionError, match=r"rank [01]: .*p=2, m=4: rank 0 holds .* like GPipe"):
        _grade(tmp_path, monkeypatch, GPIPE_ON_FIRST_CALL, runs=((2, 4),))


@pytest.mark.timeout(120)
def test_endless_loop_becomes_the_hang_hint(tmp_path, monkeypatch):
    with pytest.raises(AssertionError, match=r"the run hung.*does every loop of your one_f_one_b"):
        _grade(tmp_path, monkeypatch, ENDLESS, runs=(), timeout_s=6)


@pytest.mark.timeout(120)
def test_stub_is_not_implemented(tmp_path, monkeypatch):
    with pytest.raises(NotImplementedError, match="the 1F1B schedule is not implemented yet"):
        _grade(tmp_path, monkeypatch, STUB)


@pytest.mark.timeout(180)
def test_solution_passes_on_real_ranks(tmp_path, monkeypatch, capsys):
    _grade(tmp_path, monkeypatch, GOOD)
    out = capsys.readouterr().out
    assert out.startswith("OK: one_f_one_b is 1F1B for (p, m) in (1, 1)")
    assert "loss and every gradient match one device: 2 ranks (m=4)" in out
    assert "3 ranks (m=6): 53 gradients" in out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", sorted(set(VALID) - {"solution"}))
def test_valid_variant_passes(tmp_path, monkeypatch, capsys, name):
    _grade(tmp_path, monkeypatch, VALID[name], runs=())
    assert "OK: one_f_one_b is 1F1B" in capsys.readouterr().out


def test_the_library_generator_is_restored_after_grading():
    from course_lib.parallel import schedules as S

    with grader._guarded():
        pass
    assert [len(row) for row in S.one_f_one_b(2, 3)] == [6, 6]


def test_solution_notebook_states_the_contract_and_shows_the_grader_ok():
    path = Path(__file__).resolve().parent.parent / "solutions" / "05_pipeline_schedules.ipynb"
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    text = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    assert "`Action(op, microbatch, chunk=0)`" in text and "p - r" in text
    code = "".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    assert "one_f_one_b" not in code.split("%%writefile")[0]  # nothing of 1F1B shown before
    graders = [c for c in cells if "grader" in c["metadata"].get("tags", [])]
    shown = "".join("".join(o.get("text", "")) for c in graders for o in c["outputs"])
    assert "OK: one_f_one_b is 1F1B" in shown
