"""The pictures of a run and of a comparison: confusion matrix, training curves, accuracy against latency.

Each plot is its own ``matplotlib.figure.Figure`` written straight to PNG: no ``pyplot`` state and no backend
switch, so importing headstart never changes how a notebook user's own plots are shown, and a figure is freed
as soon as it is written.
"""

from __future__ import annotations

import functools
import hashlib
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
from PIL import Image

from . import cache
from .files import atomic_path

if TYPE_CHECKING:  # matplotlib loads where a picture is drawn: a prediction or a cached step draws none
    from matplotlib.figure import Figure


def plot_confusion(cm: np.ndarray, classes: Sequence[str], path: Path, cache_dir: str | None = None) -> Path:
    """Counts in each cell, rows normalised for colour so rare classes stay readable."""
    drawn = _drawn_once(path, cache_dir, ("confusion", np.asarray(cm).tolist(), list(classes)), lambda: _confusion_figure(cm, classes))
    assert drawn is not None  # a confusion matrix always has a picture
    return drawn


def _confusion_figure(cm: np.ndarray, classes: Sequence[str]) -> Figure:
    n = len(classes)
    size = max(4.0, 0.55 * n + 2.5)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size, size * 0.9), dpi=110)
    ax = fig.subplots()
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
    return fig


def plot_history(history: list[dict[str, Any]], path: Path, cache_dir: str | None = None) -> Path | None:
    """Loss and accuracy per epoch (see ``history_figure``), written to ``path``; ``None`` when there is nothing to
    draw (a one-shot linear head)."""
    return _drawn_once(path, cache_dir, ("history", history), lambda: history_figure(history))


def history_figure(history: list[dict[str, Any]]) -> Figure | None:
    """Loss and accuracy per epoch, one panel each. The x axis is numbered with each row's own ``epoch``, as in
    history.csv and the log (fine-tuning and scratch training start at epoch 0, the starting point); rows carrying
    a ``stage`` (head, fine-tuning …) are drawn one stage after another, the boundaries marked."""
    rows = [r for r in history if any(k.endswith(("loss", "accuracy")) for k in r)]
    if not rows:
        return None
    x = np.arange(len(rows))
    stages = [r.get("stage") for r in rows]
    starts = [i for i in range(len(rows)) if stages[i] is not None and (i == 0 or stages[i] != stages[i - 1])]
    ticks = sorted(set(range(0, len(rows), -(-len(rows) // 10))) | set(starts))  # about ten, plus each stage's first
    panels = _panels(rows)
    steps = [r for r in history if "step" in r and "lr" in r]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.2 * (len(panels) + bool(steps)), 3.6), dpi=110)
    axes = fig.subplots(1, len(panels) + bool(steps), squeeze=False)
    if steps:
        _lr_panel(axes[0][-1], steps)
    for ax, (title, keys) in zip(axes[0], panels):
        for k in keys:
            ax.plot(x, [r.get(k, np.nan) for r in rows], label=k.replace("_", " "), lw=1.6)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xticks(ticks, [str(rows[i].get("epoch", i)) for i in ticks])
        ax.grid(alpha=0.3)
        ax.legend(frameon=False, fontsize=8)
        for i in starts:
            _mark_stage(ax, i, str(stages[i]))
        _mark_kept(ax, rows)
    return fig


def _mark_kept(ax: Any, rows: list[dict[str, Any]]) -> None:
    """A dotted red line at the epoch whose weights the run kept (rows marked ``checkpoint``)."""
    for i in (i for i, r in enumerate(rows) if r.get("checkpoint")):
        ax.axvline(i, color="tab:red", ls=":", lw=1.2)
        ax.text(i, 0.02, " kept", transform=ax.get_xaxis_transform(), fontsize=8, color="tab:red")


def _lr_panel(ax: Any, steps: list[dict[str, Any]]) -> None:
    """The head's learning rate at every optimiser step, one line per stage (the one-cycle shape)."""
    for stage in dict.fromkeys(r.get("stage") for r in steps):
        mine = [r for r in steps if r.get("stage") == stage]
        ax.plot([r["step"] for r in mine], [r["lr"] for r in mine], lw=1.4, label=str(stage))
    ax.set_title("learning rate (head)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], suggestions: dict[str, float], chosen: float | None,
                 path: Path, title: str = "learning-rate range test") -> Path:
    """The lr-find curve (smoothed loss against rate, log axis) with each suggestion marked, the one used in red."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 3.8), dpi=110)
    ax = fig.subplots()
    ax.plot(lrs, losses, lw=1.6, color="tab:blue")
    ax.set_xscale("log")
    for (name, lr), marker in zip(suggestions.items(), "ovs"):
        y = float(np.interp(np.log(lr), np.log(lrs), losses))
        ax.plot([lr], [y], marker, ms=8, color="tab:red" if lr == chosen else "0.35", label=f"{name} {lr:.1e}")
    if chosen is not None and chosen not in suggestions.values():
        ax.axvline(chosen, color="tab:red", ls="--", lw=1, label=f"kept default {chosen:g}")
    ax.set_xlabel("learning rate (head)")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def _panels(rows: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(title, columns) of each panel drawn: the losses, the accuracies."""
    keys = _keys(rows)
    panels = [(title, [k for k in keys if k.endswith(title)]) for title in ("loss", "accuracy")]
    return [(t, ks) for t, ks in panels if ks]


def _mark_stage(ax: Any, i: int, stage: str) -> None:
    """A stage's name at its first epoch, and a dashed line where it follows another."""
    if i:
        ax.axvline(i - 0.5, color="0.5", ls="--", lw=1)
    ax.text(i, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), va="top", fontsize=8, color="0.3")


def _keys(rows: list[dict[str, Any]]) -> list[str]:
    """The numeric columns of the history rows, in first-seen order (the epoch number is the x axis, not a curve)."""
    return list(dict.fromkeys(k for r in rows for k in r if isinstance(r[k], (int, float)) and k != "epoch"))


def plot_leaderboard(rows: list[dict[str, Any]], path: Path, cache_dir: str | None = None) -> Path:
    """The chart people choose a model by: validation accuracy against single-photo latency, one labelled point
    per backbone (up and to the left is better), with its accuracy's 95 % interval: overlapping bars are a near tie."""
    drawn = _drawn_once(path, cache_dir, ("leaderboard", rows), lambda: _leaderboard_figure(rows))
    assert drawn is not None  # an empty leaderboard still has its picture ("no backbone finished")
    return drawn


def _leaderboard_figure(rows: list[dict[str, Any]]) -> Figure:
    done = [r for r in rows if r.get("status") == "ok" and r.get("accuracy") is not None and r.get("predict_ms") is not None]
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), dpi=110)
    ax = fig.subplots()
    placed: list[tuple[float, float]] = []
    x_span = max((r["predict_ms"] for r in done), default=1) or 1
    y_span = (max((r["accuracy"] for r in done), default=1) - min((r["accuracy"] for r in done), default=0)) or 0.01
    for r in sorted(done, key=lambda r: r["predict_ms"]):
        x, y = r["predict_ms"], r["accuracy"]
        # near-equal accuracy and latency: each further label one line lower, not printed over the first
        near = sum(abs(x - px) < 0.25 * x_span and abs(y - py) < 0.06 * y_span for px, py in placed)
        placed.append((x, y))
        ax.scatter(x, 100 * y, s=40, zorder=3)
        if r.get("accuracy_low") is not None and r.get("accuracy_high") is not None:  # its 95 % interval
            ax.errorbar(x, 100 * y, yerr=[[100 * (y - r["accuracy_low"])], [100 * (r["accuracy_high"] - y)]], fmt="none",
                        ecolor="0.6", elinewidth=1, capsize=3, zorder=2)
        ax.annotate(r["backbone"], (x, 100 * y), textcoords="offset points", xytext=(6, 4 - 12 * near), fontsize=9)
    if not done:
        ax.text(0.5, 0.5, "no backbone finished", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.set_xlim(0, max(r["predict_ms"] for r in done) * 1.3)
    ax.set_xlabel("single-photo predict latency (ms, median)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy vs latency")
    ax.grid(alpha=0.3)
    return fig


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """A heat-map in the 'jet' colours blended over the photo, as (H, W, 3) uint8."""
    import matplotlib

    colour = matplotlib.colormaps["jet"](heat)[..., :3] * 255
    return (image * (1 - alpha) + colour * alpha).round().clip(0, 255).astype(np.uint8)


def thumbnail(image: np.ndarray, heat: np.ndarray, size: int) -> Image.Image:
    """The overlay as a small picture (longer side ``size`` px), for galleries such as the report's worst errors."""
    thumb = Image.fromarray(overlay(image, heat))
    thumb.thumbnail((size, size), Image.Resampling.BICUBIC)
    return thumb


@functools.cache
def _drawing() -> str:
    """What a picture's look depends on besides its data: this file's code and matplotlib's version."""
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16] + version("matplotlib")


def _drawn_once(path: Path, cache_dir: str | None, data: Any, figure: Callable[[], Figure | None]) -> Path | None:
    """``figure()`` written to ``path``, or the same picture copied from ``<cache>/pictures/`` when this data was
    drawn before by this code: a re-run on cached features draws its run folder without importing matplotlib
    (0.4 s of a 1 s re-run)."""
    store = cache.store("pictures", cache_dir)
    name = cache.key("picture", _drawing(), data)
    known = store.read_bytes(name, ".png")
    if known is not None:
        with atomic_path(path) as tmp:
            tmp.write_bytes(known)
        return path
    fig = figure()
    if fig is None:
        return None
    _save(fig, path)
    store.write_bytes(name, ".png", path.read_bytes())
    return path


def _save(fig: Figure, path: Path) -> Path:
    """Lay out and write ``fig`` as PNG, atomically: a reader never sees half a picture."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
