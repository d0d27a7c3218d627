"""Structure of the chapter notebooks (DESIGN.md section 6).

Running the notebooks is nbval's job (CI: ``pytest --nbval-lax --nbval-current-env
notebooks/`` with ``COURSE_SMOKE=1``). These tests only read the stored files: every
chapter has a title, a ``parameters`` cell that honours ``COURSE_SMOKE``, outputs from a
clean top-to-bottom run (the book renders them), no stored errors, and no
redefinitions of library code.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CHECK_TAG = "nbval-check-output"
# Plotting boilerplate: a cell with more lines of matplotlib than this hides its input in the
# book (DESIGN.md section 6), so the reader sees the figure and can unfold the code.
MAX_PLOT_LINES = 8
HIDING_TAGS = ("hide-input", "remove-input")
FIGURE_MAKERS = {"subplots", "figure", "subplot", "add_subplot", "add_axes", "inset_axes", "twinx"}


def _code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]


def _tags(cell: nbformat.NotebookNode) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


def _source(cell: nbformat.NotebookNode) -> str:
    """The cell's Python, without IPython magics and shell escapes."""
    lines = cell.source.splitlines()
    return "\n".join(ln for ln in lines if not ln.lstrip().startswith(("%", "!")))


def _matplotlib_lines(source: str) -> int:
    """Lines that call pyplot, or a method of a figure or axes object the cell holds.

    Held are `plt`, `fig`, `ax`, `axes`, `axs`, names assigned from them (`left, right =
    plt.subplots(1, 2)`, `ax = axes[0]`) and loop variables over them (`for ax in axes.flat`).
    """
    tree = ast.parse(source)
    held = {"plt", "fig", "ax", "axes", "axs"}

    def on_held(node: ast.AST) -> bool:  # `plt.x`, `axes[0]`, `fig.add_subplot(...)`
        return isinstance(node, ast.Attribute | ast.Subscript) and (
            isinstance(node.value, ast.Name) and node.value.id in held
        )

    size = 0
    while size != len(held):  # to a fixed point: `fig = plt.figure()` before `ax = fig.gca()`
        size = len(held)
        for node in ast.walk(tree):
            value = getattr(node, "value", None)
            maker = isinstance(value, ast.Call) and getattr(value.func, "attr", "") in FIGURE_MAKERS
            made = isinstance(node, ast.Assign) and (
                on_held(value) or (maker and on_held(value.func))
            )
            looped = isinstance(node, ast.For) and any(
                isinstance(n, ast.Name) and n.id in held for n in ast.walk(node.iter)
            )
            if made or looped:
                targets = node.targets if made else [node.target]
                held |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return len({node.lineno for node in ast.walk(tree) if on_held(node)})


def _library_names() -> set[str]:
    """Top-level functions and classes defined in course_lib, read without importing."""
    names: set[str] = set()
    for path in (ROOT / "course_lib").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if not node.name.startswith("_"):
                    names.add(node.name)
    return names


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ holds no .ipynb chapters"


@pytest.fixture(params=NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def notebook(request: pytest.FixtureRequest) -> tuple[Path, nbformat.NotebookNode]:
    path: Path = request.param
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    return path, nb


def test_file_name_is_chapter_number_and_topic(notebook) -> None:
    path, _ = notebook
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), path.name


def test_starts_with_a_markdown_title(notebook) -> None:
    path, nb = notebook
    first = nb.cells[0]
    assert first.cell_type == "markdown", f"{path.name}: first cell is {first.cell_type}"
    assert first.source.lstrip().startswith("# "), f"{path.name}: first cell has no '# ' title"


def test_has_a_parameters_cell_that_reads_course_smoke(notebook) -> None:
    path, nb = notebook
    params = [c for c in nb.cells if "parameters" in _tags(c)]
    assert len(params) == 1, f"{path.name}: expected one 'parameters'-tagged cell"
    assert params[0].cell_type == "code"
    assert "COURSE_SMOKE" in params[0].source, f"{path.name}: parameters cell ignores SMOKE"


def test_is_stored_executed_in_order(notebook) -> None:
    path, nb = notebook
    counts = [c.execution_count for c in _code_cells(nb)]
    assert None not in counts, f"{path.name}: some code cells were never executed"
    assert counts == sorted(counts) and len(set(counts)) == len(counts), (
        f"{path.name}: cells were not run once, top to bottom (execution counts {counts})"
    )
    assert any(c.outputs for c in _code_cells(nb)), f"{path.name}: no stored outputs"


def test_has_no_stored_errors(notebook) -> None:
    path, nb = notebook
    for i, cell in enumerate(_code_cells(nb)):
        for out in cell.outputs:
            assert out.output_type != "error", f"{path.name} cell {i}: {out.get('ename')}"
            if out.output_type == "stream" and out.name == "stderr":
                assert "Traceback" not in out.text, f"{path.name} cell {i}: traceback in stderr"


def test_checked_cells_have_outputs_to_compare(notebook) -> None:
    path, nb = notebook
    for i, cell in enumerate(nb.cells):
        if CHECK_TAG in _tags(cell):
            assert cell.cell_type == "code" and cell.outputs, (
                f"{path.name} cell {i}: tagged {CHECK_TAG} but has no stored output"
            )


def test_does_not_redefine_library_code(notebook) -> None:
    path, nb = notebook
    library = _library_names()
    for i, cell in enumerate(_code_cells(nb)):
        tree = ast.parse(_source(cell))
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.ClassDef):
                assert node.name not in library, (
                    f"{path.name} cell {i} redefines course_lib's {node.name}; import it instead"
                )


def test_plotting_boilerplate_hides_its_input_in_the_book(notebook) -> None:
    path, nb = notebook
    untagged = [
        f"cell {i} (id {cell.get('id')}): {lines} lines"
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and cell.source.strip()
        if (lines := _matplotlib_lines(_source(cell))) > MAX_PLOT_LINES
        and not set(HIDING_TAGS) & set(_tags(cell))
    ]
    assert not untagged, (
        f"{path.name}: plotting cells with more than {MAX_PLOT_LINES} lines of matplotlib "
        f"({'; '.join(untagged)}): tag each 'hide-input' (the book shows the figure and folds "
        f"the code) or move the plot into the chapter's module"
    )
