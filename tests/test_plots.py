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
