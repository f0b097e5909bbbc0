"""Pictures of a run: the confusion matrix (and, as the product grows, curves and the HTML report)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no screen needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .files import atomic_path  # noqa: E402


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path) -> Path:
    """Counts in each cell, rows normalised for colour so rare classes stay readable."""
    n = len(classes)
    size = max(4.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=9, color="white" if norm[i, j] > 0.5 else "black")
    ax.set_title(f"confusion matrix (accuracy {np.trace(cm) / max(cm.sum(), 1):.1%})")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def plot_history(history: list[dict], path: Path) -> Path:
    """Loss and accuracy per epoch, one colour per stage (head, finetune, scratch)."""
    stages = list(dict.fromkeys(row.get("stage", "head") for row in history))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110)
    offset = 0
    for stage in stages:
        rows = [r for r in history if r.get("stage", "head") == stage]
        x = [offset + r["epoch"] for r in rows]
        for key, ax, style in (("train_loss", ax_loss, "--"), ("val_loss", ax_loss, "-"), ("train_accuracy", ax_acc, "--"), ("val_accuracy", ax_acc, "-")):
            ys = [r.get(key) for r in rows]
            if any(v is not None for v in ys):
                ax.plot(x, ys, style, label=f"{stage} {key.split('_')[0]}")
        offset = x[-1] if x else offset
    ax_loss.set_title("loss")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
