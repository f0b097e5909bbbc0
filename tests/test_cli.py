"""The command line as a user types it."""

from __future__ import annotations

import json

from click.testing import CliRunner

from conftest import HYMENOPTERA
from headstart.cli import main


def test_predict_json_and_csv(ants_run):
    _, out = ants_run
    folder = HYMENOPTERA / "val" / "ants"
    r = CliRunner().invoke(main, ["predict", str(out), str(folder), "--json", "-k", "2"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert len(rows) == 70 and sum(row["label"] == "ants" for row in rows) >= 63
    r = CliRunner().invoke(main, ["predict", str(out), str(next(folder.glob("*.jpg"))), "--csv"])
    assert r.exit_code == 0 and r.output.splitlines()[0] == "path,label,probability,top_k"


def test_backbones_lists_availability():
    r = CliRunner().invoke(main, ["backbones", "--json"])
    rows = {row["name"]: row for row in json.loads(r.output)}
    assert rows["efficientnet_lite0"]["weights"] == "package" and rows["inception_v3"]["input"] == 299


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "only").mkdir()
    r = CliRunner().invoke(main, ["train", str(tmp_path), "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "headstart: error:" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["predict", str(tmp_path)])
    assert r.exit_code == 2 and "give a run folder" in r.output


def test_train_json_summary(tmp_path):
    r = CliRunner().invoke(main, ["train", str(HYMENOPTERA), "--out", str(tmp_path / "r"), "--json", "--head", "linear"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output)
    assert summary["metrics"]["val"]["accuracy"] >= 0.93 and summary["head"]["kind"] == "linear"


def test_crop_pct_takes_a_share_or_auto(tmp_path):
    for bad in ("2", "0.1", "whole"):
        r = CliRunner().invoke(main, ["train", str(HYMENOPTERA), "--crop-pct", bad, "--out", str(tmp_path / "r")])
        assert r.exit_code == 2 and "from 0.3 to 1.0" in r.output and "or auto" in r.output, r.output
    assert not (tmp_path / "r").exists()
