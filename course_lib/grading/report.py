"""The student's grading command: ``python -m course_lib grade [NOTEBOOK...]`` (``make grade``).

Runs each exercise notebook top to bottom under nbval (the same runner CI uses for the
chapters: pytest with ``--nbval-lax``, a fresh kernel per notebook in the notebook's
folder) and prints a score table: per exercise, the grader cells (cells tagged
``grader``) that passed out of all, then each failure's hint, the last line of the
grader's error, not its traceback. The exit status is 0 only when every grader cell of
every notebook passed, so an instructor's autograder can call it too.

The notebook is read from disk: save it in JupyterLab first.
"""

from __future__ import annotations

import contextlib
import io
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
import pytest

GRADER_TAG = "grader"
EXERCISES = Path(__file__).resolve().parents[2] / "exercises"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass
class CellVerdict:
    """One executed cell: its index in the notebook, whether it grades, passed, and why not."""

    index: int  # nbval's cell number (code cells counted from 0)
    grader: bool
    passed: bool
    hint: str = ""
    call: str = ""  # the cell's last call's first line: the grading call a student knows


@dataclass
class NotebookScore:
    """One exercise notebook's verdicts, in cell order."""

    path: Path
    cells: list[CellVerdict] = field(default_factory=list)
    problem: str = ""  # set when the notebook could not be run at all

    @property
    def graders(self) -> list[CellVerdict]:
        return [c for c in self.cells if c.grader]

    @property
    def passed(self) -> bool:
        return not self.problem and bool(self.graders) and all(c.passed for c in self.graders)


def hint_of(traceback_text: str) -> str:
    """The error's last line (``AssertionError: rank 1: ...``), without terminal colours."""
    lines = [ln.strip() for ln in _ANSI.sub("", traceback_text).splitlines() if ln.strip()]
    return lines[-1] if lines else "the cell failed without a message"


class _Collector:
    """A pytest plugin that records nbval's verdict for every cell it runs."""

    def __init__(self) -> None:
        self.cells: dict[str, list[CellVerdict]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: Any, call: Any):
        outcome = yield
        report = outcome.get_result()
        if report.when != "call" or not hasattr(item, "cell"):
            return
        tags = item.cell.get("metadata", {}).get("tags", [])
        hint = ""
        if report.failed and call.excinfo is not None:
            inner = getattr(call.excinfo.value, "inner_traceback", None)
            hint = hint_of(inner or str(call.excinfo.value))
        source = item.cell.source
        lines = re.findall(r"^[A-Za-z_][\w.]*\(.*$", source, flags=re.M) or [
            ln for ln in source.splitlines() if ln.strip()
        ]
        call = lines[-1].strip() if lines else ""
        call = call + "...)" if call.endswith("(") else call
        verdict = CellVerdict(item.cell_num, GRADER_TAG in tags, report.passed, hint, call)
        self.cells.setdefault(str(item.fspath), []).append(verdict)


def grade_notebooks(paths: list[Path], cell_timeout_s: int = 600) -> list[NotebookScore]:
    """Run each notebook under nbval and collect every cell's verdict."""
    scores = [NotebookScore(Path(p).resolve()) for p in paths]
    runnable = []
    for score in scores:
        if not score.path.is_file():
            score.problem = "no such notebook"
            continue
        nb = nbformat.read(score.path, as_version=4)
        if not any(GRADER_TAG in c.get("metadata", {}).get("tags", []) for c in nb.cells):
            score.problem = f"no cell is tagged {GRADER_TAG!r}: is this an exercise notebook?"
            continue
        runnable.append(score)
    if runnable:
        collector = _Collector()
        with tempfile.TemporaryDirectory() as tmp:
            ini = Path(tmp) / "pytest.ini"
            ini.write_text("[pytest]\n")  # none of the project's options: only nbval's
            args = ["-c", str(ini), "-p", "no:cacheprovider", "-q", "--nbval-lax",
                    "--nbval-current-env", f"--nbval-cell-timeout={cell_timeout_s}",
                    *[str(s.path) for s in runnable]]  # fmt: skip
            with contextlib.redirect_stdout(io.StringIO()):
                pytest.main(args, plugins=[collector])
        for score in runnable:
            score.cells = collector.cells.get(str(score.path), [])
            if not score.cells:
                score.problem = "nbval ran no cell of it (is it a valid notebook?)"
    return scores


def format_table(scores: list[NotebookScore]) -> str:
    """The score table, then one line per failing cell with its hint."""
    width = max([len("exercise")] + [len(s.path.name) for s in scores])
    lines = [f"{'exercise':<{width}}  graders passed", f"{'-' * width}  --------------"]
    for s in scores:
        graders = s.graders
        done = sum(c.passed for c in graders)
        result = s.problem or f"{done} / {len(graders)}" + ("" if s.passed else "  FAIL")
        lines.append(f"{s.path.name:<{width}}  {result}")
    for s in scores:
        for c in s.cells:
            if not c.passed:
                kind = "grader cell" if c.grader else "cell"
                call = c.call if len(c.call) <= 90 else c.call[:87] + "..."
                lines.append(f"\n{s.path.name}, {kind} {c.index} ({call}):\n  {c.hint}")
    total = sum(len(s.graders) for s in scores)
    done = sum(c.passed for s in scores for c in s.graders)
    lines.append(f"\n{done} / {total} grader cells passed")
    return "\n".join(lines)


def main(paths: list[Path] | None = None, cell_timeout_s: int = 600) -> int:
    """Grade ``paths`` (default: every notebook in exercises/); 0 only when all graders pass."""
    paths = paths or sorted(EXERCISES.glob("*.ipynb"))
    if not paths:
        print(f"no notebooks to grade (none given, and {EXERCISES} holds none)")
        return 2
    scores = grade_notebooks(paths, cell_timeout_s)
    print(format_table(scores))
    return 0 if all(s.passed for s in scores) else 1
