"""Generate the learner's exercise notebooks from the solution notebooks.

Chapter 1 introduces the pipeline; every chapter's graded exercise goes through it.
A solution notebook in ``solutions/`` marks the answer inside code cells::

    ### BEGIN SOLUTION
    ...the answer...
    ### END SOLUTION

The exercise notebook in ``exercises/`` is the same notebook with each marked region
replaced by a stub that raises ``NotImplementedError`` (indented like the region), and
with every output cleared. ``exercises/`` is never edited by hand::

    python -m course_lib.exercises            # regenerate exercises/ from solutions/
    python -m course_lib.exercises --check    # exit 1 if exercises/ is out of date
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

BEGIN = "### BEGIN SOLUTION"
END = "### END SOLUTION"
STUB = 'raise NotImplementedError("Your code here: replace this line with your solution.")'
_BEGIN_RE = re.compile(r"^(\s*)### BEGIN SOLUTION\s*$")


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace each BEGIN/END SOLUTION region of ``source`` with an indented stub.

    Raises ValueError, naming ``where``, for a region that is nested or never closed.
    """
    out: list[str] = []
    indent: str | None = None  # set while inside a region
    for line in source.splitlines(keepends=False):
        match = _BEGIN_RE.match(line)
        if match:
            if indent is not None:
                raise ValueError(f"{where}: nested '{BEGIN}' (close the first region first)")
            indent = match.group(1)
            out.append(f"{indent}{STUB}")
        elif line.strip() == END:
            if indent is None:
                raise ValueError(f"{where}: '{END}' without a '{BEGIN}' before it")
            indent = None
        elif indent is None:
            out.append(line)
    if indent is not None:
        raise ValueError(f"{where}: '{BEGIN}' is never closed by '{END}'")
    return "\n".join(out)


def make_exercise(solution: dict, name: str = "notebook") -> dict:
    """The exercise version of a solution notebook (a dict in nbformat 4 JSON)."""
    notebook = json.loads(json.dumps(solution))  # deep copy
    regions = 0
    for index, cell in enumerate(notebook["cells"]):
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        if cell["cell_type"] == "code":
            if BEGIN in source:
                regions += source.count(BEGIN)
                source = strip_solutions(source, where=f"{name}, cell {index}")
            cell["outputs"] = []
            cell["execution_count"] = None
        cell["source"] = source
        cell.get("metadata", {}).pop("execution", None)
    if regions == 0:
        raise ValueError(f"{name}: no '{BEGIN}' region found; a solution needs at least one")
    return notebook


def dumps_notebook(notebook: dict) -> str:
    """Serialise like Jupyter does (indent 1, sorted keys), so diffs stay small."""
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def generate(solutions_dir: Path, exercises_dir: Path) -> dict[Path, str]:
    """Map each exercise path to its text, generated from ``solutions_dir/*.ipynb``."""
    result = {}
    for path in sorted(solutions_dir.glob("*.ipynb")):
        solution = json.loads(path.read_text(encoding="utf-8"))
        exercise = make_exercise(solution, name=str(path))
        result[exercises_dir / path.name] = dumps_notebook(exercise)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m course_lib.exercises",
        description="Write exercises/*.ipynb from solutions/*.ipynb (solution regions -> stubs).",
    )
    root = Path(__file__).resolve().parent.parent
    parser.add_argument("--solutions", type=Path, default=root / "solutions", help="input dir")
    parser.add_argument("--exercises", type=Path, default=root / "exercises", help="output dir")
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if an exercise is stale"
    )
    args = parser.parse_args(argv)
    generated = generate(args.solutions, args.exercises)
    stale = [p for p, text in generated.items() if not p.is_file() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {path} (run: python -m course_lib.exercises)")
        return 1 if stale else 0
    args.exercises.mkdir(parents=True, exist_ok=True)
    for path in stale:
        path.write_text(generated[path], encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
