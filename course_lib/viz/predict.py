"""Predict, then measure (DESIGN.md section 6): print a reader's guess beside the number.

Chapters 0-4 import ``said``; before each headline measurement a cell asks the reader to
set a variable (``predicted_... = None``), and the measuring cell calls ``said`` with it.
Chapters 5 and 6 carry an older copy in their set-up cell.
"""

from __future__ import annotations


def _number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def prediction_error(prediction: float, measured: float) -> float | None:
    """Relative error of ``prediction`` against ``measured`` ((measured - guess) / guess)."""
    if prediction == 0:
        return None
    return (measured - prediction) / prediction


def said(
    prediction: float | None, measured: float, what: str, unit: str = "", kind: str = "measured"
) -> None:
    """Print ``what``: the reader's prediction, the ``kind`` value, and how far off it was.

    ``prediction=None`` (the reader skipped the prediction cell) prints the measurement and
    a reminder. ``kind`` names where the number comes from: "measured", "simulated",
    "modelled". It returns nothing, so that a notebook cell ending in ``said(...)`` shows
    the line once.
    """
    unit = f" {unit}" if unit else ""
    if prediction is None:
        text = f"{what}: {kind} {_number(measured)}{unit} (write a prediction above first)"
    else:
        error = prediction_error(prediction, measured)
        off = "n/a" if error is None else f"{error:+.0%}"
        text = (
            f"{what}: you predicted {_number(prediction)}{unit}, {kind} "
            f"{_number(measured)}{unit} (off by {off})"
        )
    print(text)
