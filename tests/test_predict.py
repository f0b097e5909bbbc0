"""Bundles: saved and loaded without pickle, digest-checked, predicting the same as before."""

from __future__ import annotations

import json

import numpy as np
import pytest

import headstart
from conftest import HYMENOPTERA
from headstart.data import HeadstartError


def test_bundle_round_trip_predicts_the_same(ants_run, tmp_path):
    clf, out = ants_run
    loaded = headstart.load(out)
    photos = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:6]
    a, b = clf.predict(photos, top_k=2), loaded.predict(photos, top_k=2)
    assert [p.top[0][0] for p in a] == [p.top[0][0] for p in b]
    np.testing.assert_allclose([p.top[0][1] for p in a], [p.top[0][1] for p in b], atol=1e-6)
    assert sum(p.top[0][0] == "bees" for p in b) >= 5
    assert abs(sum(q for _, q in b[0].top) - 1) < 1e-4


def test_evaluate_on_another_folder(ants_run, tmp_path):
    _, out = ants_run
    m = headstart.load(out).evaluate(HYMENOPTERA / "val", out=tmp_path / "ev")
    assert m["n"] == 153 and m["accuracy"] >= 0.93
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n"] == 153
    assert (tmp_path / "ev" / "confusion_matrix.png").is_file()


def test_unreadable_photo_gets_an_error_not_a_crash(ants_run, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    good = next((HYMENOPTERA / "val" / "ants").glob("*.jpg"))
    clf = headstart.load(ants_run[1])
    preds = clf.predict([bad, good])
    assert preds[0].error and "bad.jpg" in preds[0].path and not preds[0].top
    assert preds[1].top == clf.predict([good])[0].top  # the bad file does not shift the others


def test_tampered_or_incomplete_bundle_is_refused(ants_run, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ants_run[1], copy)
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(HeadstartError, match="does not match the digest"):
        headstart.load(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(HeadstartError, match="not a headstart model folder"):
        headstart.load(copy)


def test_evaluate_refuses_unknown_classes(ants_run, tmp_path):
    from conftest import save_image

    save_image(tmp_path / "ants" / "a.jpg")
    save_image(tmp_path / "wasps" / "w.jpg")
    with pytest.raises(HeadstartError, match="not trained on: wasps"):
        headstart.load(ants_run[1]).evaluate(tmp_path)
