"""course_lib.viz.predict: the prediction line chapters 0-4 print beside a measurement."""

from course_lib.viz.predict import prediction_error, said


def test_said_without_a_prediction_asks_for_one(capsys):
    text = said(None, 2048, "bytes sent", "B")
    assert text == "bytes sent: measured 2,048 B (write a prediction above first)"
    assert capsys.readouterr().out.strip() == text


def test_said_reports_the_relative_error_and_the_kind():
    text = said(100, 150, "step", "ms", kind="simulated")
    assert text == "step: you predicted 100 ms, simulated 150 ms (off by +50%)"
    assert said(0, 3.0, "x").endswith("(off by n/a)")


def test_prediction_error_sign_and_zero():
    assert prediction_error(4.0, 2.0) == -0.5
    assert prediction_error(0.0, 1.0) is None
