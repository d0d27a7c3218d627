"""The exercise pipeline: exercises/ is up to date, fails only in grader cells, solution passes."""

import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NAMES = sorted(p.name for p in (ROOT / "solutions").glob("*.ipynb"))


def _execute(src: Path, tmp_path: Path):
    path = tmp_path / src.name
    shutil.copy(src, path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=120,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    return nb


def _errors(nb):
    return {
        i: out
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    }


@pytest.mark.timeout(300)
def test_exercises_up_to_date():
    proc = subprocess.run(
        [sys.executable, "-m", "course_lib.exercises", "--check"], cwd=ROOT, capture_output=True
    )
    assert proc.returncode == 0, proc.stdout.decode()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_exercise_fails_only_in_grader_cells(tmp_path, name):
    nb = _execute(ROOT / "exercises" / name, tmp_path)
    graders = {i for i, c in enumerate(nb.cells) if "grader" in c.metadata.get("tags", [])}
    errors = _errors(nb)
    assert graders and set(errors) == graders
    assert all(e.ename == "NotImplementedError" for e in errors.values()), errors


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", NAMES)
def test_solution_runs_clean(tmp_path, name):
    nb = _execute(ROOT / "solutions" / name, tmp_path)
    assert _errors(nb) == {}
