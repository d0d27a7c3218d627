"""course_lib.viz.predict: the prediction line chapters 0-4 print beside a measurement."""

from course_lib.viz.predict import prediction_error, said


def test_said_without_a_prediction_asks_for_one(capsys):
    assert said(None, 2048, "bytes sent", "B") is None  # a cell ending in said() shows it once
    expected = "bytes sent: measured 2,048 B (write a prediction above first)\n"
    assert capsys.readouterr().out == expected


def test_said_reports_the_relative_error_and_the_kind(capsys):
    said(100, 150, "step", "ms", kind="simulated")
    said(0, 3.0, "x")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "step: you predicted 100 ms, simulated 150 ms (off by +50%)"
    assert lines[1].endswith("(off by n/a)")


def test_prediction_error_sign_and_zero():
    assert prediction_error(4.0, 2.0) == -0.5
    assert prediction_error(0.0, 1.0) is None
