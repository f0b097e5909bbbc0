"""Ensembles of runs: the members' probabilities averaged, measured on the split they were trained on, saved as a
self-contained folder that predicts and evaluates like a run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import headstart
from conftest import CLOTHING, HYMENOPTERA, WEIGHTS, save_image
from headstart.cli import main
from headstart.data import HeadstartError
from headstart.ensemble import Ensemble


@pytest.fixture(scope="module")
def two_runs(ants_run, tmp_path_factory) -> tuple[Path, Path]:
    other = tmp_path_factory.mktemp("runs") / "mobilenetv2"
    headstart.train(HYMENOPTERA, out=other, backbone="mobilenetv2", weights=str(WEIGHTS / "mobilenetv2_100.safetensors"), progress=False)
    return ants_run[1], other


@pytest.mark.slow
def test_an_ensemble_averages_its_members_and_travels_as_one_folder(two_runs, tmp_path):
    out = tmp_path / "ens"
    r = CliRunner().invoke(main, ["ensemble", *map(str, two_runs), "--out", str(out), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    val = summary["metrics"]["val"]
    assert val["n"] == 153 and val["accuracy"] >= 0.93
    assert [m["backbone"] for m in summary["members"]] == ["efficientnet_lite0", "mobilenetv2"]
    assert (out / "metrics.json").is_file() and (out / "confusion_matrix.png").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert "<h2>Members</h2>" in page and "mobilenetv2" in page and "Worst errors" in page

    ens = headstart.load(out)  # a run or an ensemble, whichever the folder holds
    assert isinstance(ens, Ensemble) and len(ens.members) == 2
    photos = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:4]
    members = [headstart.load(p) for p in two_runs]
    want = np.mean([m.proba(photos)[0] for m in members], axis=0)
    preds = ens.predict(photos)
    assert [p.top[0][0] for p in preds] == [ens.classes[i] for i in want.argmax(1)]
    assert [p.top[0][1] for p in preds] == pytest.approx(want.max(1), abs=1e-5)
    again = ens.evaluate(HYMENOPTERA, split="val")
    assert again["accuracy"] == pytest.approx(val["accuracy"])

    moved = tmp_path / "moved"  # self-contained: the members travel inside it
    shutil.move(str(out), moved)
    r = CliRunner().invoke(main, ["predict", str(moved), str(photos[0]), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)[0]["label"] == "bees", r.output


@pytest.mark.slow
def test_an_unreadable_photo_is_reported_not_fatal(two_runs, tmp_path):
    ens = headstart.ensemble.build(list(two_runs))
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    good = next((HYMENOPTERA / "val" / "ants").glob("*.jpg"))
    preds = ens.predict([bad, good])
    assert preds[0].error and "broken.jpg" in preds[0].path and not preds[0].top
    assert preds[1].top[0][0] == "ants"


@pytest.mark.slow
def test_members_must_share_classes_and_split(two_runs, tmp_path):
    folder = tmp_path / "cats_dogs"
    for cls in ("cats", "dogs"):
        for i in range(6):
            save_image(folder / cls / f"{i}.png", color=(40 * i, 200 if cls == "cats" else 10, 90))
    stranger = tmp_path / "stranger"
    headstart.train(folder, out=stranger, head="linear", progress=False)
    r = CliRunner().invoke(main, ["ensemble", str(two_runs[0]), str(stranger), "--out", str(tmp_path / "e")])
    assert r.exit_code == 2 and str(stranger) in r.output and "classes" in r.output
    assert not (tmp_path / "e").exists()
    with pytest.raises(HeadstartError, match="at least two"):
        headstart.ensemble.build([two_runs[0]])
    with pytest.raises(HeadstartError, match="already holds a run"):  # never written over a run folder
        headstart.ensemble.build(list(two_runs), out=stranger)


@pytest.mark.slow
def test_one_network_apis_name_the_members_and_the_cli_exports_each(two_runs, tmp_path):
    out = headstart.ensemble.build(list(two_runs), tmp_path / "ens").path
    with pytest.raises(HeadstartError, match="is an ensemble.*1-efficientnet_lite0"):
        headstart.export_onnx(out)  # one graph per network: the API takes a member
    member = out / "members" / "1-efficientnet_lite0"
    photos = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:3]
    assert headstart.load(member).predict(photos[:1])[0].top

    r = CliRunner().invoke(main, ["export", str(out), "--json"])  # the command exports every member in place
    assert r.exit_code == 0, r.output
    assert sorted(Path(row["onnx"]).parent.name for row in json.loads(r.output)) == ["1-efficientnet_lite0", "2-mobilenetv2"]
    r = CliRunner().invoke(main, ["predict", str(out), *map(str, photos), "--json", "--engine", "onnxruntime"])
    assert r.exit_code == 0, r.output
    ort = json.loads(r.output)
    torch_side = headstart.load(out).predict(photos)
    assert [p["label"] for p in ort] == [p.top[0][0] for p in torch_side]
    assert [p["probability"] for p in ort] == pytest.approx([p.top[0][1] for p in torch_side], abs=1e-3)


@pytest.mark.slow
def test_on_clothing_the_ensemble_beats_each_member(tmp_path):
    """What ensembles are for, on the harder shared set: Lite0 and Lite1 on the whole frame score 84.9 and 88.0 %
    on validation alone, 88.9 % averaged (measured; on test 84.1, 90.7 and 90.2 %: the ensemble is ranked by
    validation, and on test it stays within a photo of its best member)."""
    rows = {r["backbone"]: r for r in headstart.compare(CLOTHING, ["efficientnet_lite0", "efficientnet_lite1"], tmp_path / "cmp",
                                                        progress=False, crop_pct=1.0, ensemble=True)}
    members = [rows[n] for n in ("efficientnet_lite0", "efficientnet_lite1")]
    assert rows["ensemble"]["rank"] == 1 and rows["ensemble"]["accuracy"] >= 0.86
    assert rows["ensemble"]["accuracy"] > max(m["accuracy"] for m in members)
    one_photo = 1 / 214  # clothing's test split
    assert rows["ensemble"]["test_accuracy"] >= max(m["test_accuracy"] for m in members) - one_photo - 1e-9
