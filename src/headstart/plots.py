"""The pictures of a run: confusion matrix, training curves, accuracy against latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

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


def plot_history(history: list[dict[str, Any]], path: Path) -> Path | None:
    """Loss and accuracy per epoch, one panel each; rows carrying a ``stage`` (head, fine-tuning …) are drawn
    in order with the stage boundaries marked. ``None`` when there is nothing to draw (a one-shot linear head)."""
    rows = [r for r in history if any(k.endswith(("loss", "accuracy")) for k in r)]
    if not rows:
        return None
    x = np.arange(1, len(rows) + 1)
    panels = [("loss", [k for k in _keys(rows) if k.endswith("loss")]), ("accuracy", [k for k in _keys(rows) if k.endswith("accuracy")])]
    panels = [(t, ks) for t, ks in panels if ks]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.6), dpi=110, squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            ax.plot(x, [r.get(k, np.nan) for r in rows], label=k.replace("_", " "), lw=1.6)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
        stages = [r.get("stage") for r in rows]
        for i in range(len(rows)):
            if stages[i] is not None and (i == 0 or stages[i] != stages[i - 1]):
                if i:
                    ax.axvline(x[i] - 0.5, color="0.5", ls="--", lw=1)
                ax.text(x[i], 1.0, f" {stages[i]}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="0.3")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path


def _keys(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r if isinstance(r[k], (int, float)) and k != "epoch"))


def plot_leaderboard(rows: list[dict[str, Any]], path: Path) -> Path:
    """The chart people choose a model by: validation accuracy against single-photo latency, one labelled point
    per backbone (up and to the left is better)."""
    done = [r for r in rows if r.get("status") == "ok" and r.get("accuracy") is not None and r.get("predict_ms") is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    placed: list[tuple[float, float]] = []
    x_span = max((r["predict_ms"] for r in done), default=1) or 1
    y_span = (max((r["accuracy"] for r in done), default=1) - min((r["accuracy"] for r in done), default=0)) or 0.01
    for r in sorted(done, key=lambda r: r["predict_ms"]):
        x, y = r["predict_ms"], r["accuracy"]
        # near-equal accuracy and latency: each further label one line lower, not printed over the first
        near = sum(abs(x - px) < 0.25 * x_span and abs(y - py) < 0.06 * y_span for px, py in placed)
        placed.append((x, y))
        ax.scatter(x, 100 * y, s=40, zorder=3)
        ax.annotate(r["backbone"], (x, 100 * y), textcoords="offset points", xytext=(6, 4 - 12 * near), fontsize=9)
    if not done:
        ax.text(0.5, 0.5, "no backbone finished", ha="center", va="center", transform=ax.transAxes)
    else:
        ms = [r["predict_ms"] for r in done]
        ax.set_xlim(0, max(ms) * 1.3)
    ax.set_xlabel("single-photo predict latency (ms, median)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
