"""Metrics as a user reads them: a class missing from the evaluated split is said, marked and left out of the
averages instead of counted as an F1 of 0."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

from headstart import evaluate


def test_a_class_without_photos_in_the_split_is_said_and_marked(caplog):
    y = np.array([0] * 6 + [1] * 4)  # no photo of class 2 ('wasps')
    proba = np.eye(3)[np.array([0] * 6 + [1, 1, 1, 0])] * 0.9 + 0.1 / 3
    with caplog.at_level(logging.WARNING, logger="headstart"), warnings.catch_warnings():
        warnings.simplefilter("error")  # scikit-learn's own "y_pred contains classes not in y_true" would fail here
        m = evaluate.evaluate(y, proba, ["ants", "bees", "wasps"], split="the val split")
    assert m["absent"] == ["wasps"]
    assert m["macro_f1"] > 0.85  # over ants and bees: 'wasps' would pull it down to about 0.6
    said = caplog.text
    assert "the val split has no photos of 'wasps'" in said and "Move a few photos of 'wasps'" in said
    text = evaluate.format_report(m)
    assert "wasps" in text and "no photos of this class here" in text
    assert "cover the 2 classes with photos" in text
    assert evaluate.headline({"val": m})["val"]["absent"] == ["wasps"]


def test_every_class_present_says_nothing(caplog):
    y = np.array([0, 1, 1, 0])
    with caplog.at_level(logging.WARNING, logger="headstart"), warnings.catch_warnings():
        warnings.simplefilter("error")  # certain predictions: clipped, they must still sum to one for scikit-learn
        m = evaluate.evaluate(y, np.eye(2)[y], ["a", "b"])
    assert m["absent"] == [] and m["macro_f1"] == 1.0 and caplog.text == ""


def test_remembered_metrics_are_read_back_and_still_warn(tmp_path, monkeypatch, caplog):
    """A re-run's metrics come from the cache (no scikit-learn), equal to the first computation, and the missing
    class is still said; other labels are computed afresh."""
    y = np.array([0] * 6 + [1] * 4)
    proba = np.eye(3)[np.array([0] * 6 + [1, 1, 1, 0])] * 0.9 + 0.1 / 3
    paths = [f"p{i}.jpg" for i in range(10)]
    first = evaluate.remembered(y, proba, ["ants", "bees", "wasps"], paths, "the val split", str(tmp_path))
    monkeypatch.setattr(evaluate, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("computed again")))
    with caplog.at_level(logging.WARNING, logger="headstart"):
        again = evaluate.remembered(y, proba, ["ants", "bees", "wasps"], paths, "the val split", str(tmp_path))
    assert again == first and "no photos of 'wasps'" in caplog.text
    monkeypatch.undo()
    other = evaluate.remembered(y[::-1], proba, ["ants", "bees", "wasps"], paths, "the val split", str(tmp_path))
    assert other["accuracy"] != first["accuracy"]


def test_the_accuracy_comes_with_its_95_percent_interval():
    """Wilson's interval (by hand here: p ± z·sqrt(p(1-p)/n + z²/4n²), centred at (p + z²/2n) / (1 + z²/n)): on
    ants/bees' 153 validation photos 145 right reads 94.8 % within 90.0-97.3 %; it narrows as photos are added."""
    z = 1.959963984540054

    def wilson(k: int, n: int) -> tuple[float, float]:
        p = k / n
        centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return centre - half, centre + half

    for k, n in ((145, 153), (188, 225), (0, 10), (10, 10)):
        assert evaluate.accuracy_interval(k, n) == pytest.approx(wilson(k, n), abs=1e-9)
    y = np.array([0] * 76 + [1] * 77)
    proba = np.eye(2)[np.where(np.arange(153) < 8, 1 - y, y)]  # 8 of 153 wrong
    m = evaluate.evaluate(y, proba, ["ants", "bees"])
    lo, hi = m["accuracy_ci95"]
    assert m["accuracy"] == pytest.approx(145 / 153) and lo < m["accuracy"] < hi
    assert evaluate.headline({"val": m})["val"]["accuracy_ci95"] == [lo, hi]
    assert evaluate.interval_text(m) == "95% CI 90.0–97.3%" and evaluate.interval_text({"accuracy": 0.9}) == ""
    assert "accuracy: 0.9477 (95% CI 90.0–97.3%)   balanced" in evaluate.format_report(m)  # classification_report.txt
    assert np.diff(evaluate.accuracy_interval(1450, 1530)) < np.diff([lo, hi]) / 3
