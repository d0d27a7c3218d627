"""The exercise generator (chapter 1's pipeline): solution regions become stubs."""

import json

import pytest

from course_lib.exercises import STUB, dumps_notebook, generate, make_exercise, strip_solutions


def _notebook(*sources: str) -> dict:
    cells = [
        {
            "cell_type": "code",
            "execution_count": 3,
            "metadata": {"tags": ["grader"]} if "grade" in s else {},
            "outputs": [{"output_type": "stream", "name": "stdout", "text": "x\n"}],
            "source": s,
        }
        for s in sources
    ]
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def test_region_becomes_indented_stub_and_the_rest_stays():
    source = "def f(x):\n    ### BEGIN SOLUTION\n    y = x + 1\n    return y\n"
    source += "    ### END SOLUTION\n"
    source += "print(f)"
    assert strip_solutions(source) == f"def f(x):\n    {STUB}\nprint(f)"


def test_two_regions_in_one_cell():
    source = "### BEGIN SOLUTION\na = 1\n### END SOLUTION\nb = 2\n### BEGIN SOLUTION\nc = 3\n"
    source += "### END SOLUTION"
    assert strip_solutions(source) == f"{STUB}\nb = 2\n{STUB}"


@pytest.mark.parametrize(
    "source, problem",
    [
        ("### BEGIN SOLUTION\na = 1\n", "never closed"),
        ("a = 1\n### END SOLUTION\n", "without a"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "nested"),
    ],
)
def test_malformed_regions_are_named(source, problem):
    with pytest.raises(ValueError, match=problem):
        strip_solutions(source, where="sol.ipynb, cell 4")


def test_exercise_clears_outputs_and_keeps_tags():
    solution = _notebook("### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "grade(x)")
    exercise = make_exercise(solution)
    assert [c["outputs"] for c in exercise["cells"]] == [[], []]
    assert exercise["cells"][0]["source"] == STUB
    assert exercise["cells"][1]["metadata"]["tags"] == ["grader"]
    assert solution["cells"][0]["outputs"], "the solution itself must not be modified"


def test_solution_without_regions_is_an_error():
    with pytest.raises(ValueError, match="no '### BEGIN SOLUTION' region"):
        make_exercise(_notebook("x = 1"))


def test_generate_writes_one_exercise_per_solution(tmp_path):
    (tmp_path / "sol").mkdir()
    nb = _notebook("### BEGIN SOLUTION\nx = 1\n### END SOLUTION")
    (tmp_path / "sol" / "01_a.ipynb").write_text(json.dumps(nb))
    out = generate(tmp_path / "sol", tmp_path / "ex")
    assert list(out) == [tmp_path / "ex" / "01_a.ipynb"]
    assert out[tmp_path / "ex" / "01_a.ipynb"] == dumps_notebook(make_exercise(nb))
