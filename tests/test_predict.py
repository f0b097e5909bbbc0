"""Bundles: saved and loaded without pickle, digest-checked, predicting the same as before."""

from __future__ import annotations

import json
from pathlib import Path

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


def _edited_copy(run, tmp_path, edit) -> Path:
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    edit(cfg)
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


@pytest.mark.parametrize("edit", [
    lambda c: c["classes"].append("wasps"),  # the head has 2 outputs, the config says 3
    lambda c: c["backbone"].update(timm_name="tf_efficientnet_lite1"),  # other architecture, same digest
    lambda c: c["head"].update(kind="mlp" if c["head"]["kind"] == "linear" else "linear"),
], ids=["classes", "architecture", "head"])
def test_weights_that_do_not_fit_their_config_are_refused(ants_run, tmp_path, edit):
    with pytest.raises(HeadstartError, match="does not fit its config.json.*refusing to load"):
        headstart.load(_edited_copy(ants_run[1], tmp_path, edit))


def test_damaged_config_is_refused(ants_run, tmp_path):
    copy = _edited_copy(ants_run[1], tmp_path, lambda c: None)
    (copy / "config.json").write_text((copy / "config.json").read_text()[:-20])
    with pytest.raises(HeadstartError, match="not valid JSON.*retrain or restore"):
        headstart.load(copy)


def test_pickle_in_place_of_the_weights_is_never_unpickled(ants_run, tmp_path):
    """Even with its digest written into config.json (a deliberate attack), a pickle is refused, not run."""
    import pickle

    from headstart.files import sha256_file

    marker = tmp_path / "pwned"
    copy = _edited_copy(ants_run[1], tmp_path, lambda c: None)
    (copy / "model.safetensors").write_bytes(pickle.dumps(_Exploit(str(marker))))
    digest = sha256_file(copy / "model.safetensors")
    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(cfg | {"model_sha256": digest}))
    with pytest.raises(HeadstartError, match="not a safetensors file.*refusing to load"):
        headstart.load(copy)
    assert not marker.exists()


class _Exploit:
    """Unpickling this creates a file: the proof that something unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_predicting_with_a_run_imports_neither_torch_nor_timm(ants_run):
    """With the run's feature graph cached (training made it), loading and predicting is ONNX Runtime, Pillow and
    numpy: importing torch and timm would cost seconds before a single photo is answered."""
    import subprocess
    import sys

    _, out = ants_run
    photo = next((HYMENOPTERA / "val" / "bees").glob("*.jpg"))
    code = (f"import sys, headstart; p = headstart.load({str(out)!r}).predict([{str(photo)!r}])[0]; "
            "print(p.top[0][0], sorted(m for m in ('torch', 'timm', 'torchvision', 'onnx') if m in sys.modules))")  # ONNX Runtime only
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split(" ", 1) == ["bees", "[]\n"], r.stdout
