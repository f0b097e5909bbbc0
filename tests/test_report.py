"""report.html: written by every train, self-contained, rebuilt from the run folder alone."""

from __future__ import annotations

import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

import headstart
from conftest import HYMENOPTERA, ants_bees
from headstart import report
from headstart.cli import main
from headstart.data import HeadstartError


def external_refs(page: str) -> list[str]:
    refs = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"', page)
    return [r for r in refs if re.match(r"(https?:)?//", r)]


def parse_tags(page: str) -> list[tuple[str, list[tuple[str, str | None]]]]:
    """Every start tag the browser would see, with its attributes."""
    tags = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            tags.append((tag, attrs))

    Tags().feed(page)
    return tags


def copy_run(run: Path, dest: Path) -> Path:
    """A run folder without its (large) model file: the report needs only the readable files."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("model.safetensors", "report.html"))
    return dest


def test_train_writes_a_self_contained_report(ants_run):
    clf, out = ants_run
    page = (out / "report.html").read_text()
    assert not external_refs(page) and "<script" not in page and "<link" not in page
    assert "data:image/png;base64," in page  # the confusion matrix, embedded
    errors = json.loads((out / "metrics.json").read_text())["worst_errors"]
    assert page.count("data:image/jpeg;base64,") == 2 * len(errors) > 0  # each worst error: thumbnail + Grad-CAM
    assert errors[0]["true"] in page and f"{errors[0]['confidence']:.0%}" in page
    assert ">ants</td><td>124</td><td>70</td>" in page  # images per class and split
    assert f"{clf.info['metrics']['val']['accuracy']:.1%}" in page
    lo, hi = clf.info["metrics"]["val"]["accuracy_ci95"]
    assert f"<div class=note>95% CI {100 * lo:.1f}–{100 * hi:.1f}%</div>" in page  # under the accuracy card
    assert "precision" in page and "recall" in page  # the per-class table
    assert "Head chosen by 5-fold cross-validation of 3 candidates on the training split" in page  # 244 photos: 5 folds


def test_report_command_rebuilds_from_the_run_folder_alone(ants_run, tmp_path, monkeypatch):
    run = copy_run(ants_run[1], tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["report", "run"])
    assert r.exit_code == 0, r.output
    first = (run / "report.html").read_text()

    def gone(*a, **k):  # the photos have moved away since training
        raise ValueError("file not found")

    monkeypatch.setattr(report, "open_rgb", gone)
    report.build_report(run)
    again = (run / "report.html").read_text()
    n = len(json.loads((run / "metrics.json").read_text())["worst_errors"])
    assert again.count("data:image/jpeg;base64,") == first.count("data:image/jpeg;base64,") == n  # kept thumbnails


def test_training_curves_with_stages_and_without_history(ants_run, tmp_path):
    run = copy_run(ants_run[1], tmp_path / "run")
    cfg = json.loads((run / "config.json").read_text())
    cfg["history"] = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "val_accuracy": 0.8 + e / 100} for e in range(1, 6)]
    cfg["history"] += [{"stage": "fine-tune", "epoch": e, "train_loss": 0.1 / e, "val_loss": 0.2, "val_accuracy": 0.9} for e in range(1, 4)]
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "history.png").unlink(missing_ok=True)  # a folder without its picture: the report draws it from config.json
    page = report.build_report(run).read_text()
    assert Image.open(run / "history.png").size[0] > 400
    assert "No per-epoch curve" not in page
    assert not any(run.glob("training_curves*"))  # the picture is history.png, written once, not a second copy
    assert report.plot_history([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()


def test_error_overlay_hook_adds_a_picture_per_error(ants_run, tmp_path):
    run = copy_run(ants_run[1], tmp_path / "run")
    n = len(json.loads((run / "metrics.json").read_text())["worst_errors"])
    seen = []

    def heat(photo: Path) -> Image.Image:
        seen.append(photo)
        return Image.new("RGB", (300, 200), (255, 0, 0))

    page = report.build_report(run, error_overlay=heat).read_text()
    assert len(seen) == n and all(p.is_file() for p in seen)
    assert page.count("data:image/jpeg;base64,") == 2 * n

    def broken(photo: Path) -> Image.Image:
        raise RuntimeError("no gradients here")

    page = report.build_report(run, error_overlay=broken).read_text()  # an optional picture never costs the report
    assert page.count("data:image/jpeg;base64,") == n


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(HeadstartError, match="neither a run folder"):
        report.build_report(tmp_path)


def test_names_from_the_folder_are_shown_as_text_never_as_markup(tmp_path):
    """A class folder and file names holding HTML: the page shows them, escaped, and runs nothing."""
    evil = "<img src=x onerror=alert(1)>"
    root = tmp_path / "data"
    for split, n in (("train", 8), ("val", 4)):
        for cls, src in ((evil, "ants"), ("bees", "bees")):
            (root / split / cls).mkdir(parents=True)
            for p in sorted((HYMENOPTERA / split / src).glob("*.jpg"))[:n]:
                shutil.copy(p, root / split / cls / p.name)
    # a bee filed under the other class (an error worth showing) and a file that is no image (listed as skipped)
    shutil.copy(sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[-1], root / "val" / evil / 'a"b<c.jpg')
    (root / "train" / evil / 'x"y<z.jpg').write_bytes(b"not a photo")

    headstart.train(root, out=tmp_path / "run", progress=False)
    page = (tmp_path / "run" / "report.html").read_text()
    errors = json.loads((tmp_path / "run" / "metrics.json").read_text())["worst_errors"]
    assert any(e["path"].endswith('a"b<c.jpg') for e in errors)  # so its card is on the page
    assert evil not in page
    tags = parse_tags(page)
    assert not [t for t in tags if any(k.startswith("on") for k, _ in t[1])]  # no element got an event handler
    assert all(dict(a)["src"].startswith("data:image/") for t, a in tags if t == "img")
    assert "&lt;img src=x onerror=alert(1)&gt;</td>" in page  # the class, in the tables
    assert 'a"b<c' not in page and "a&#34;b&lt;c.jpg</span>" in page  # the worst error's caption
    assert 'x"y<z' not in page and "x&#34;y&lt;z.jpg</code>" in page  # the skipped file


def test_the_report_says_which_photos_chose_between_fine_tuning_and_the_head():
    from headstart.report import _finetune_choice

    said = _finetune_choice({"held_out_photos": 200, "fit_photos": 800, "loss_before": 0.453, "loss_after": 0.563,
                             "lr": 1e-3, "lr_source": "ft_lr"})
    assert "200 training photos held out" in said and "kept: the frozen head" in said and "validation split chose nothing" in said
    assert "kept: the fine-tuned network" in _finetune_choice({"held_out_photos": 10, "fit_photos": 38, "loss_before": 0.5,
                                                               "loss_after": 0.4, "lr": 1e-4, "lr_source": "lr-find (valley)"})
    calibrated = _finetune_choice({"held_out_photos": 200, "fit_photos": 800, "loss_before": 0.45, "loss_after": 0.41, "loss": "calibrated",
                                   "lr": 1e-3, "lr_source": "ft_lr"})
    assert "calibrated loss (cross-entropy at the best temperature) 0.450" in calibrated and "kept: the fine-tuned network" in calibrated
    blended = _finetune_choice({"held_out_photos": 200, "fit_photos": 800, "loss_before": 0.448, "loss_after": 0.438, "loss": "calibrated",
                                "loss_finetuned": 0.503, "blends": {"0": 0.448, "0.25": 0.438, "0.5": 0.449, "0.75": 0.471, "1": 0.503},
                                "blend": 0.25, "lr": 1e-3, "lr_source": "ft_lr"})
    assert "0.448 with the head refitted on those, 0.503 fine-tuned, and for blends of the two (0.25: 0.438, 0.5: 0.449, 0.75: 0.471)" in blended
    assert "kept: a blend of 0.25 fine-tuned and 0.75 starting weights" in blended
    assert _finetune_choice(None) is None


def test_the_report_says_why_a_head_below_the_top_cv_row_was_chosen():
    """The one-standard-error rule can keep the linear head under a higher MLP row: the page says why, and says
    nothing when the top row is the head used."""
    from headstart import report

    table = [{"kind": "mlp", "params": {}, "cv_accuracy": 0.857, "cv_log_loss": 0.42, "cv_se": 0.012},
             {"kind": "linear", "params": {"C": 0.05}, "cv_accuracy": 0.850, "cv_log_loss": 0.43, "cv_se": 0.010}]
    said = report._one_se({"head_selection": table, "head": {"kind": "linear"}})
    assert said is not None and "one standard error" in said and "±1.2%" in said and "linear" in said
    assert report._one_se({"head_selection": table, "head": {"kind": "mlp"}}) is None


def test_a_folder_with_two_photos_a_class_says_why_the_mlp_was_not_tried(tmp_path):
    """Below 3 training photos in a class --head auto leaves the MLP out (heads.HEADS' min_photos): the run uses the
    linear head and its page says why, instead of a candidate silently missing from the table."""
    root = tmp_path / "data"
    ants_bees(root, {"train": 2, "val": 3})
    clf = headstart.train(root, out=tmp_path / "run", progress=False)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert clf.info["head"]["kind"] == "linear" and {r["kind"] for r in cfg["head_selection"]} == {"linear"}
    page = (tmp_path / "run" / "report.html").read_text()
    assert "The mlp head was not tried: it needs 3 training photos in every class" in page
    assert report._untried({**cfg, "train_config": {**cfg["train_config"], "head": "linear"}}) is None  # asked for: nothing to explain
    full = {"train_config": {"head": "auto"}, "head": {"kind": "linear"},
            "head_selection": [{"kind": "mlp"}, {"kind": "linear"}]}
    assert report._untried(full) is None
