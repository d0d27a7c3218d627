"""What every grader shares: import the learner's module on a rank, name a stub, tolerances.

Chapters 1-4's graders (``course_lib.grading.chNN_*``) run the learner's code on real
ranks and compare with a reference; they take the helpers and the tolerances from here.
"""

from __future__ import annotations

import importlib
import sys

from course_lib.launch import RankError

# fp32 against the single-device reference, when the summation order may differ
# (DESIGN.md section 5): the one pair of tolerances every grader uses.
RTOL = 1.3e-6
ATOL = 1e-5


def import_learner(cwd: str, module_name: str):
    """On a rank: import the learner's ``%%writefile`` module from the notebook's folder, fresh."""
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    importlib.invalidate_caches()
    return importlib.import_module(module_name)


def stub_error(err: RankError, what: str, module_name: str) -> NotImplementedError | None:
    """The learner-facing error when a rank hit the exercise's stub, else None."""
    if any("NotImplementedError" in tb for tb in err.tracebacks.values()):
        return NotImplementedError(
            f"{what} is not implemented yet: replace the stub in {module_name}.py"
        )
    return None
