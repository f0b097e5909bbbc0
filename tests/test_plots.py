"""The run's pictures are drawn on their own Figures: importing headstart leaves a notebook's matplotlib alone."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image

from headstart import plots


def test_importing_headstart_picks_no_backend_and_no_pyplot():
    code = (
        "import sys, matplotlib, headstart, headstart.report, headstart.explain\n"
        "print(matplotlib.rcParams._get_backend_or_none(), 'matplotlib.pyplot' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["None", "False"]


def test_plots_are_written_as_png(tmp_path):
    cm = np.array([[8, 2], [1, 9]])
    assert Image.open(plots.plot_confusion(cm, ["ants", "bees"], tmp_path / "cm.png")).size[0] > 300
    history = [{"epoch": e, "train_loss": 1 / e, "val_accuracy": 0.8 + e / 100} for e in range(1, 4)]
    assert Image.open(plots.plot_history(history, tmp_path / "h.png")).size[0] > 600  # two panels
    assert plots.plot_history([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    rows = [{"backbone": "a", "status": "ok", "accuracy": 0.9, "predict_ms": 10}, {"backbone": "b", "status": "skipped"}]
    assert Image.open(plots.plot_leaderboard(rows, tmp_path / "lb.png")).size[0] > 300
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cm.png", "h.png", "lb.png"]  # no temporary file left


def test_history_is_numbered_as_history_csv_numbers_it():
    """The picture's epochs are the CSV's: a scratch run's 0–3 (epoch 0 is the starting point), and a head's
    1–N followed by fine-tuning's 0–M, each stage's numbers as logged."""
    scratch = [{"stage": "scratch", "epoch": e, "val_loss": 1.0 - e / 10, "val_accuracy": 0.5 + e / 10} for e in range(4)]
    fig = plots.history_figure(scratch)
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]
    staged = [{"stage": "head", "epoch": e, "train_loss": 1 / e} for e in range(1, 4)]
    staged += [{"stage": "finetune", "epoch": e, "train_loss": 0.1, "val_loss": 0.2} for e in range(3)]
    assert [t.get_text() for t in plots.history_figure(staged).axes[0].get_xticklabels()] == ["1", "2", "3", "0", "1", "2"]
    long = [{"epoch": e, "train_loss": 1 / e} for e in range(1, 31)]
    labels = [t.get_text() for t in plots.history_figure(long).axes[0].get_xticklabels()]
    assert labels[0] == "1" and len(labels) <= 11 and all(int(a) < int(b) for a, b in zip(labels, labels[1:]))


def test_a_picture_drawn_before_is_copied_not_drawn(tmp_path, monkeypatch):
    """The same confusion matrix again (a re-run on cached features) is the same PNG, copied from the cache without
    matplotlib; different counts draw a new picture."""
    cm = np.array([[5, 1], [2, 7]])
    first = plots.plot_confusion(cm, ["ants", "bees"], tmp_path / "a.png", str(tmp_path / "cache"))
    monkeypatch.setattr(plots, "_save", lambda *a: (_ for _ in ()).throw(AssertionError("drawn again")))
    again = plots.plot_confusion(cm, ["ants", "bees"], tmp_path / "b.png", str(tmp_path / "cache"))
    assert again.read_bytes() == first.read_bytes()
    monkeypatch.undo()
    other = plots.plot_confusion(cm.T, ["ants", "bees"], tmp_path / "c.png", str(tmp_path / "cache"))
    assert other.read_bytes() != first.read_bytes() and Image.open(other).size == Image.open(first).size


def test_history_draws_the_learning_rate_per_step_and_marks_the_kept_epoch(tmp_path):
    rows = [{"stage": "finetune", "epoch": 0, "val_loss": 0.5}]
    for e in (1, 2):
        rows += [{"stage": "finetune", "step": 2 * e - 1 + i, "lr": 1e-3 * (i + 1)} for i in range(2)]
        rows.append({"stage": "finetune", "epoch": e, "train_loss": 0.6 - e / 10, "val_loss": 0.5 - e / 20})
    rows[-1]["checkpoint"] = True
    fig = plots.history_figure(rows)
    lr_axis = fig.axes[-1]
    assert lr_axis.get_title() == "learning rate (head)" and list(lr_axis.lines[0].get_ydata()) == [1e-3, 2e-3, 1e-3, 2e-3]
    loss_axis = fig.axes[0]
    assert any(t.get_text() == " kept" for t in loss_axis.texts)  # at the kept epoch
    assert len(loss_axis.lines[0].get_xdata()) == 3  # the step rows are not epochs
    path = plots.plot_lr_find([1e-5, 1e-4, 1e-3, 1e-2], [0.7, 0.65, 0.6, 2.0], {"valley": 1e-4}, 1e-4, tmp_path / "lr.png")
    assert path.stat().st_size > 1000
