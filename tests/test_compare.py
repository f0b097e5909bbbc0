"""`compare` as a user runs it: several backbones on the same real photos, one leaderboard, skipped backbones
listed with the reason instead of a crash."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

import headstart
from conftest import HYMENOPTERA, WEIGHTS, ants_bees
from headstart.cli import main
from headstart.compare import compare, format_table, rank
from headstart.data import HeadstartError

PER_CLASS = 20


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ants_bees(tmp_path_factory.mktemp("subset") / "ants_bees", {"train": PER_CLASS, "val": PER_CLASS})


@pytest.fixture(scope="module")
def offline():
    """resnet50 has no packaged weights: with the hub unreachable it has none at all (and no network is touched)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(headstart.backbones, "_reachable", lambda *a, **k: False)
        mp.delenv("HF_ENDPOINT", raising=False)
        yield


@pytest.fixture(scope="module")
def cmp(subset: Path, offline, tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    out = tmp_path_factory.mktemp("cmp") / "cmp"
    # the skipped backbone sits in the middle of the list: the leaderboard must still put it last
    rows = compare(subset, ["efficientnet_lite1", "resnet50", "efficientnet_lite0"], out, progress=False, head="linear")
    return rows, out


@pytest.mark.slow
def test_leaderboard_files_and_skipped_backbone(cmp):
    rows, out = cmp
    with open(out / "leaderboard.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][0] == "backbone" and table[0][3:6] == ["accuracy", "accuracy_low", "accuracy_high"]
    assert [r[0] for r in table[1:]] == [r["backbone"] for r in rows]
    by_name = {r["backbone"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    assert set(by_name) == {"efficientnet_lite0", "efficientnet_lite1", "resnet50"}
    skipped = by_name["resnet50"]
    assert skipped["status"] == "skipped: no weights"
    assert "no pretrained weights" in skipped["reason"] and "--weights" in skipped["reason"]
    md = (out / "leaderboard.md").read_text()
    assert "| resnet50 |" in md and "skipped: no weights" in md and "| 95% CI |" in md
    for name in ("efficientnet_lite0", "efficientnet_lite1"):
        r = by_name[name]
        assert r["status"] == "ok" and 0.7 <= r["accuracy"] <= 1 and r["params"] > 3_000_000
        assert r["accuracy_low"] < r["accuracy"] < r["accuracy_high"] <= 1  # its 95 % interval, in the table too
        assert f"{100 * r['accuracy_low']:.1f}–{100 * r['accuracy_high']:.1f}%" in md
        assert r["predict_ms"] > 0 and r["extract_img_s"] > 0 and r["train_s"] > 0
        assert (out / r["run"] / "config.json").is_file() and (out / r["run"] / "report.html").is_file()
    assert by_name["efficientnet_lite0"]["input_size"] == 224 and by_name["efficientnet_lite1"]["input_size"] == 240
    assert not (out / "resnet50").exists()
    from PIL import Image

    assert Image.open(out / "accuracy_vs_latency.png").size[0] > 300


@pytest.mark.slow
def test_leaderboard_ranks_by_accuracy_skipped_last(cmp):
    rows, _ = cmp
    done = [r for r in rows if r["status"] == "ok"]
    assert [r["rank"] for r in done] == [1, 2]
    assert done[0]["accuracy"] >= done[1]["accuracy"]
    assert rows[-1]["backbone"] == "resnet50" and "rank" not in rows[-1]


def test_rank_orders_by_accuracy_then_f1_then_speed():
    rows = [
        {"backbone": "slow", "status": "ok", "accuracy": 0.9, "macro_f1": 0.9, "predict_ms": 90},
        {"backbone": "none", "status": "skipped: no weights"},
        {"backbone": "best", "status": "ok", "accuracy": 0.95, "macro_f1": 0.9, "predict_ms": 99},
        {"backbone": "fast", "status": "ok", "accuracy": 0.9, "macro_f1": 0.9, "predict_ms": 10},
    ]
    assert [r["backbone"] for r in rank(rows)] == ["best", "fast", "slow", "none"]


@pytest.mark.slow
def test_compare_report_is_self_contained(cmp):
    rows, out = cmp
    page = (out / "report.html").read_text()
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    assert refs and not [r for r in refs if re.match(r"(https?:)?//", r)]
    assert "<script" not in page and "<link" not in page
    for r in rows:
        assert f">{r['backbone']}<" in page
    assert "skipped: no weights" in page
    assert page.count("data:image/png;base64,") >= 2  # the accuracy-vs-latency plot and the confusion matrix
    best = json.loads((out / rows[0]["run"] / "metrics.json").read_text())
    assert page.count("data:image/jpeg;base64,") == len(best["worst_errors"]) > 0  # worst-error thumbnails


@pytest.mark.slow
def test_warm_rerun_reuses_measured_throughput(cmp, subset, tmp_path):
    rows, out = cmp
    first = {r["backbone"]: r for r in rows}["efficientnet_lite1"]
    assert first["extract_note"].startswith("this run")  # lite1's features were computed by the fixture's run
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(out / "leaderboard.json", again / "leaderboard.json")
    (row,) = compare(subset, ["efficientnet_lite1"], again, progress=False, head="linear")
    assert json.loads((again / row["run"] / "config.json").read_text())["timing"]["embeddings_computed"] == 0
    assert row["extract_img_s"] == first["extract_img_s"] and row["extract_note"].startswith("earlier run")
    assert row["accuracy"] == pytest.approx(first["accuracy"])  # same split, same features, same head


def test_require_pretrained_stops_with_the_reason(subset, offline, tmp_path):
    with pytest.raises(HeadstartError, match="no pretrained weights for backbone 'resnet50'"):
        compare(subset, ["resnet50"], tmp_path / "c", require_pretrained=True, progress=False)


def test_unknown_backbone_or_option_fails_before_training(subset, tmp_path):
    with pytest.raises(HeadstartError, match="unknown backbone 'efficientnet_lite9'"):
        compare(subset, ["efficientnet_lite0", "efficientnet_lite9"], tmp_path / "c")
    with pytest.raises(HeadstartError, match="unknown training option.*epochz"):
        compare(subset, ["efficientnet_lite0"], tmp_path / "c", epochz=3)
    assert not (tmp_path / "c").exists()


def test_cli_compare_prints_the_table(subset, offline, tmp_path):
    r = CliRunner().invoke(main, ["compare", str(subset), "--backbones", "resnet50,mobilenetv2", "--out", str(tmp_path / "c"),
                                  "--weights", f"MobileNetV2={WEIGHTS / 'mobilenetv2_100.safetensors'}", "--head", "linear"])
    assert r.exit_code == 0, r.output
    assert "skipped: no weights" in r.output and (tmp_path / "c" / "leaderboard.csv").is_file()
    assert "--weights resnet50=PATH" in r.output  # the fix named in compare's own terms
    rows = {row["backbone"]: row for row in csv.DictReader((tmp_path / "c" / "leaderboard.csv").open())}
    assert rows["mobilenetv2"]["status"] == "ok" and "mobilenetv2_100.safetensors" in rows["mobilenetv2"]["weights"]
    r = CliRunner().invoke(main, ["compare", str(subset), "--backbones", "resnet50", "--require-pretrained", "--out", str(tmp_path / "d")])
    assert r.exit_code == 2 and "no pretrained weights" in r.output


@pytest.mark.slow
def test_rerun_reuses_finished_runs_until_a_photo_changes(tmp_path, offline):
    """Re-running compare must not retrain what did not change, and must retrain what did (by content)."""
    data = ants_bees(tmp_path / "data", {"train": PER_CLASS, "val": PER_CLASS})
    out = tmp_path / "cmp"
    first = {r["backbone"]: r for r in compare(data, ["efficientnet_lite0"], out, progress=False, head="linear")}
    again = {r["backbone"]: r for r in compare(data, ["efficientnet_lite0"], out, progress=False, head="linear")}
    assert again["efficientnet_lite0"].get("reused") and not first["efficientnet_lite0"].get("reused")
    assert again["efficientnet_lite0"]["accuracy"] == first["efficientnet_lite0"]["accuracy"]
    other = {r["backbone"]: r for r in compare(data, ["efficientnet_lite0"], out, progress=False, head="mlp")}
    assert not other["efficientnet_lite0"].get("reused")  # other settings: trained again
    photo = next((data / "train" / "ants").iterdir())
    target = photo.resolve()
    photo.unlink()
    shutil.copy(HYMENOPTERA / "train" / "bees" / sorted(p.name for p in (HYMENOPTERA / "train" / "bees").iterdir())[0], photo)
    assert photo.read_bytes() != target.read_bytes()
    changed = {r["backbone"]: r for r in compare(data, ["efficientnet_lite0"], out, progress=False, head="mlp")}
    assert not changed["efficientnet_lite0"].get("reused")  # same file name, other content: trained again


@pytest.mark.slow
def test_a_comparison_folder_makes_an_ensemble_of_its_pretrained_runs(cmp, tmp_path):
    rows, out = cmp
    ens = headstart.ensemble.build([out], tmp_path / "ens")
    assert [m.backbone.spec.name for m in ens.members] == [r["backbone"] for r in rows if r["status"] == "ok"]
    assert len(ens.members) == 2  # resnet50 was skipped: no weights here
    assert ens.info["metrics"]["val"]["accuracy"] >= 0.85


@pytest.mark.slow
def test_compare_with_ensemble_adds_the_averaged_row(cmp, subset, tmp_path):
    """Same subset and settings as the fixture: every run reads its features and head from the cache."""
    out = tmp_path / "c"
    rows = {r["backbone"]: r for r in compare(subset, ["efficientnet_lite0", "efficientnet_lite1"], out, progress=False, head="linear", ensemble=True)}
    ens = rows["ensemble"]
    assert ens["status"] == "ok" and ens["rank"] in (1, 2, 3) and ens["accuracy"] >= 0.85
    assert ens["params"] == rows["efficientnet_lite0"]["params"] + rows["efficientnet_lite1"]["params"]
    assert ens["predict_ms"] > 0 and ens["weights"] == "efficientnet_lite0 + efficientnet_lite1"
    assert (out / "ensemble" / "ensemble.json").is_file() and "ensemble" in (out / "leaderboard.csv").read_text()
    assert len(headstart.ensemble.build([out]).members) == 2  # its own ensemble is not a member


@pytest.mark.parametrize("given,words", [("mobilenetv2", "give BACKBONE=FILE"), ("mobilenetv2=/nowhere.safetensors", "no such file"),
                                         (f"resnet50={WEIGHTS / 'mobilenetv2_100.safetensors'}", "'resnet50' is not among the compared")])
def test_compare_weights_option_is_checked_before_training(subset, tmp_path, given, words):
    r = CliRunner().invoke(main, ["compare", str(subset), "--backbones", "mobilenetv2,efficientnet_lite0",
                                  "--weights", given, "--out", str(tmp_path / "c")])
    assert r.exit_code == 2 and words in r.output, r.output
    assert not (tmp_path / "c").exists()


def test_a_leaderboard_saved_before_the_interval_shows_an_empty_cell():
    """Rows from an earlier compare (read back on a re-run, or served) lack the interval: an empty cell, not a crash."""
    from headstart.report import cell, columns

    old = {"backbone": "a", "status": "ok", "accuracy": 0.9, "macro_f1": 0.9, "predict_ms": 9}
    new = {**old, "accuracy_low": 0.85, "accuracy_high": 0.93}
    ci = next(c for c in columns([old]) if c[0] == "95% CI")
    assert cell(old, ci[1], ci[2]) == "" and cell(new, ci[1], ci[2]) == "85.0–93.0%"
    assert "85.0–93.0%" in format_table(rank([new])) and format_table(rank([old]))
