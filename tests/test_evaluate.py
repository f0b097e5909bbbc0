"""Metrics as a user reads them: a class missing from the evaluated split is said, marked and left out of the
averages instead of counted as an F1 of 0."""

from __future__ import annotations

import logging
import warnings

import numpy as np

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
