"""``python -m course_lib grade``: the student's score table, on passing and failing notebooks."""

import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from course_lib.grading import report

ROOT = Path(__file__).resolve().parents[1]


def _notebook(path: Path, *cells: tuple[str, bool]) -> Path:
    """Write a notebook of code cells; each is (source, tagged grader)."""
    nb = nbformat.v4.new_notebook()
    for source, grader in cells:
        cell = nbformat.v4.new_code_cell(source)
        if grader:
            cell.metadata["tags"] = ["grader"]
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def passing(tmp_path: Path) -> Path:
    return _notebook(tmp_path / "01_pass.ipynb", ("x = 2", False), ("assert x == 2", True),
                     ("assert x * x == 4", True))  # fmt: skip


@pytest.fixture
def failing(tmp_path: Path) -> Path:
    return _notebook(tmp_path / "02_fail.ipynb", ("x = 1", False), ("assert x == 1", True),
                     ("assert x == 2, 'x should be 2: add one to it'", True))  # fmt: skip


@pytest.mark.timeout(300)
def test_scores_a_passing_and_a_failing_notebook(passing, failing, capsys):
    status = report.main([passing, failing])
    out = capsys.readouterr().out
    assert status == 1
    assert "01_pass.ipynb  2 / 2" in out.replace("  ", "  ")
    assert "02_fail.ipynb" in out and "1 / 2  FAIL" in out
    assert "02_fail.ipynb, grader cell 2 (assert x == 2, " in out
    assert "  AssertionError: x should be 2: add one to it" in out
    assert "Traceback" not in out and "\x1b[" not in out
    assert "3 / 4 grader cells passed" in out


@pytest.mark.timeout(300)
def test_all_passing_exits_zero(passing, capsys):
    assert report.main([passing]) == 0
    assert "2 / 2 grader cells passed" in capsys.readouterr().out


@pytest.mark.timeout(300)
def test_a_notebook_without_graders_is_named(tmp_path, capsys):
    plain = _notebook(tmp_path / "chapter.ipynb", ("x = 1", False))
    assert report.main([plain, tmp_path / "missing.ipynb"]) == 1
    out = capsys.readouterr().out
    assert "no cell is tagged 'grader'" in out and "no such notebook" in out


@pytest.mark.timeout(300)
def test_command_line_on_a_fresh_exercise(tmp_path):
    """The real chapter 1 exercise, as a student first opens it: every grader says 'stub'."""
    exercise = tmp_path / "01_collectives.ipynb"
    exercise.write_bytes((ROOT / "exercises" / "01_collectives.ipynb").read_bytes())
    proc = subprocess.run([sys.executable, "-m", "course_lib", "grade", str(exercise)],
                          capture_output=True, text=True, timeout=280)  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL" in proc.stdout and "not implemented yet" in proc.stdout
    assert "0 / " in proc.stdout
