"""``report.html``, the one page a person reads: data, training, metrics, the worst errors with thumbnails, and
for a comparison the leaderboard (whose table, also printed by ``headstart compare``, is formatted here).

Python gathers plain values from the run folder; the Jinja2 templates in ``templates/`` lay them out, with
autoescape on, so a class or file name is always shown as text. The page is self-contained (inline CSS, images
as data URIs, no script) so it opens offline and can be mailed as one file. The pictures come from plots.py.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Callable

import jinja2
import numpy as np
from PIL import Image

from . import cache
from .config import HeadstartError
from .data import open_rgb, to_rgb
from .evaluate import interval_text, percent_range
from .files import atomic_write_text
from .heads import HEADS, cv_rank
from .plots import plot_confusion, plot_history, plot_leaderboard

log = logging.getLogger("headstart")


# ------------------------------------------------------------------------------------------ the leaderboard table

TABLE: list[tuple[str, Any, Any]] = [  # (heading, key or keys, format string or function)
    ("#", "rank", "{}"),
    ("backbone", "backbone", "{}"),
    ("accuracy", "accuracy", "{:.1%}"),
    ("95% CI", ("accuracy_low", "accuracy_high"), percent_range),  # two backbones whose intervals overlap are close
    ("balanced", "balanced_accuracy", "{:.1%}"),
    ("macro-F1", "macro_f1", "{:.3f}"),
    ("test acc.", "test_accuracy", "{:.1%}"),
    ("params", "params", "{:,.0f}"),
    ("input", "input_size", "{} px"),
    ("extract img/s", "extract_img_s", "{:.1f}"),
    ("predict ms", "predict_ms", "{:.0f}"),
    ("train s", "train_s", "{:.1f}"),
]


def columns(rows: list[dict[str, Any]]) -> list[tuple[str, Any, Any]]:
    """The table's columns, less test accuracy when no run had a test split."""
    return [c for c in TABLE if c[1] != "test_accuracy" or any(r.get("test_accuracy") is not None for r in rows)]


def cell(row: dict[str, Any], key: str | tuple[str, ...], fmt: str | Callable[..., str]) -> str:
    """One formatted value (or several, for a key tuple); a missing one (a skipped backbone has no accuracy, a
    leaderboard saved before the interval was kept has no interval) is an empty cell."""
    values = [row.get(k) for k in (key if isinstance(key, tuple) else (key,))]
    if any(v is None for v in values):
        return ""
    return fmt(*values) if callable(fmt) else fmt.format(*values)


def format_table(rows: list[dict[str, Any]], markdown: bool = False) -> str:
    """The leaderboard as aligned text for a terminal, or as a Markdown table; skipped rows say why."""
    cols = columns(rows)
    head = [h for h, _, _ in cols] + ["status"]
    body = [[cell(r, k, f) for _, k, f in cols] + [r["status"]] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if h not in ("backbone", "status") else "---" for h in head) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
        skipped = [r for r in rows if r["status"] != "ok"]
        lines += [""] + [f"- **{r['backbone']}** {r['status']}: {r.get('reason', '')}" for r in skipped] if skipped else []
        return "\n".join(lines) + "\n"
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    left = {1, len(head) - 1}  # backbone and status read better left-aligned
    return "\n".join("  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
                     for cells in [head, *body]) + "\n"


# --------------------------------------------------------------------------------------------- the HTML report

ErrorOverlay = Callable[[Path], Image.Image]
THUMB = 200  # px, longest side of a gallery thumbnail


def build_report(folder: str | Path, *, error_overlay: ErrorOverlay | None = None) -> Path:
    """Write ``folder/report.html``: one self-contained page (inline CSS, images as data URIs, no links out).

    ``folder`` is a run folder (from ``train``) or a comparison folder (from ``compare``, with
    ``leaderboard.json``); everything comes from the files there, so the page can be rebuilt any time.
    ``error_overlay(photo) -> PIL image`` adds an extra picture to each worst error (e.g. a Grad-CAM heat map).
    """
    folder = Path(folder)
    page: dict[str, Any] = {"when": datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}
    if (folder / "leaderboard.json").is_file():
        page["comparison"] = _comparison(folder, error_overlay)
        page["title"] = f"compare — {page['comparison']['dataset']}"
    elif (folder / "config.json").is_file() or (folder / "ensemble.json").is_file():
        cfg = _read_json(folder / ("config.json" if (folder / "config.json").is_file() else "ensemble.json"))
        page["run"] = _run(folder, cfg, error_overlay)
        page["title"] = f"{page['run']['dataset']} — {page['run']['backbone']['name']}"
    else:
        raise HeadstartError(f"'{folder}' is neither a run folder (config.json), an ensemble (ensemble.json) nor a comparison folder (leaderboard.json)")
    atomic_write_text(folder / "report.html", _templates().get_template("report.html").render(page))
    return folder / "report.html"


@functools.lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    """The page's templates, shipped inside the package. Autoescape is on for everything: class names, file
    names and error messages come from the user's folders and must never become markup."""
    return jinja2.Environment(loader=jinja2.PackageLoader("headstart", "templates"), autoescape=True,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def _comparison(folder: Path, overlay: ErrorOverlay | None) -> dict[str, Any]:
    """The comparison page's data: the leaderboard as formatted cells, the chart, and the best run."""
    rows = _read_json(folder / "leaderboard.json")["rows"]
    done = [r for r in rows if r.get("status") == "ok"]
    best = done[0] if done else None
    best_run = folder / best["run"] if best else None
    has_best = best_run is not None and (best_run / "config.json").is_file()
    best_cfg = _read_json(best_run / "config.json") if has_best else None
    cols = columns(rows)
    explained = [r for r in rows if r.get("reason")]  # a skipped backbone's reason is a footnote, its row stays one line
    table = [_board_row(folder, r, cols, r is best, explained) for r in rows]
    plot = folder / "accuracy_vs_latency.png"
    if not plot.is_file():  # an older folder, or the chart was deleted: it is drawn from leaderboard.json alone
        plot_leaderboard(rows, plot)
    return {
        "dataset": Path(best_cfg["data"]["root"]).name if best_cfg else "?",
        "n_done": len(done),
        "n_rows": len(rows),
        "best": {"backbone": best["backbone"], "accuracy": f"{best['accuracy']:.1%}"} if best else None,
        "headings": [h for h, _, _ in cols],
        "link_column": [k for _, k, _ in cols].index("backbone"),
        "rows": table,
        "notes": [{"n": i, "backbone": r["backbone"], "status": r["status"], "reason": r["reason"]} for i, r in enumerate(explained, 1)],
        "plot": _img(plot.read_bytes(), "accuracy against latency", "plot"),
        "run": _run(best_run, best_cfg, overlay) if best_cfg else None,
    }


def _board_row(folder: Path, r: dict[str, Any], cols: list[tuple[str, str, str]], best: bool, explained: list[dict[str, Any]]) -> dict[str, Any]:
    """One leaderboard row as the template shows it: formatted cells, the link to the run's own page, and for a
    skipped backbone the number of the footnote that gives its reason."""
    return {
        "cells": [cell(r, k, f) for _, k, f in cols],
        "href": f"{r['run']}/report.html" if r.get("run") and (folder / r["run"] / "report.html").is_file() else None,
        "status": r["status"],
        "reason": r.get("reason"),
        "note": explained.index(r) + 1 if r in explained else None,
        "cls": "skipped" if r["status"] != "ok" else ("best" if best else None),
    }


def _run(run: Path, cfg: dict[str, Any], overlay: ErrorOverlay | None) -> dict[str, Any]:
    """A run's (or an ensemble's) part of the page, as plain values the template lays out."""
    b, data, head = cfg.get("backbone", {}), cfg.get("data", {}), cfg.get("head", {})
    splits = [(n, _read_json(_split_file(run, n, "metrics.json"))) for n in ("val", "test") if _split_file(run, n, "metrics.json").is_file()]
    splits = [(n, m) for n, m in splits if m.get("n")]
    cards = [{"value": value, "label": f"{n} {label}", "note": interval_text(m) if label == "accuracy" else ""} for n, m in splits
             for label, value in (("accuracy", f"{m['accuracy']:.1%}"), ("balanced accuracy", f"{m['balanced_accuracy']:.1%}"),
                                  ("macro-F1", f"{m['macro_f1']:.3f}"), ("images", str(m["n"])))]
    ensemble = "member_metrics" in cfg  # an ensemble: its members instead of a training story
    return {
        "dataset": Path(data.get("root", run.name)).name,
        "backbone": {k: b.get(k, "?") for k in ("name", "timm_name", "weights_source")},
        "input": "×".join(map(str, cfg.get("preprocess", {}).get("input_size", [])[1:])),  # chosen by the run when "auto"
        "head": head.get("kind", "?"),
        "data_root": data.get("root", "?"),
        "cards": cards,
        "counts": _counts(data),
        "skipped": [{"path": s["path"], "reason": s["reason"]} for s in data.get("skipped", [])],
        "members": [_member(m) for m in cfg["member_metrics"]] if ensemble else None,
        "members_dir": str(run / "members"),
        "training": None if ensemble else _training(run, cfg),
        "splits": [_split(run, n, m, overlay) for n, m in splits],
        "leaks": _leaks(cfg.get("leaks") or {}),
    }


def _leaks(leaks: dict[str, Any], shown: int = 20) -> dict[str, Any] | None:
    """The warning training wrote when validation or test photos have a copy in train, with the first pairs."""
    if not leaks.get("warning"):
        return None
    pairs = leaks.get("pairs", [])
    rows = [[p["split"], p["path"], p["train_path"], "same bytes" if p["how"] == "exact-bytes" else f"near copy ({p['similarity']:.2f})",
             p["label"] if p["same_label"] else f"{p['label']} / train: {p['train_label']}"] for p in pairs[:shown]]
    return {"warning": leaks["warning"], "rows": rows, "more": max(0, len(pairs) - shown)}


def _split_file(run: Path, split: str, name: str) -> Path:
    """evaluate.write's naming: validation files unprefixed, the others prefixed by their split."""
    return run / (name if split == "val" else f"{split}_{name}")


def _counts(data: dict[str, Any]) -> dict[str, Any] | None:
    """Images per class (rows) and split (columns), with the totals: those used, and where some listed files were
    unreadable, "used of listed"; ``None`` when the run recorded none (``counts``: a folder written before the
    two were told apart, when unreadable files were counted as used)."""
    used, classes = data.get("used", data.get("counts", {})), data.get("classes", [])
    if not used:
        return None
    listed, names = data.get("listed", used), list(used)

    def shown(u: int, n: int) -> str:
        return str(u) if u == n else f"{u} of {n}"

    return {"splits": names, "rows": [[c, *(shown(used[n].get(c, 0), listed[n].get(c, 0)) for n in names)] for c in classes],
            "total": [shown(sum(used[n].values()), sum(listed[n].values())) for n in names], "partial": listed != used}


def _training(run: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """How the head (and with --crop-pct/--input-size auto, the crop and size) was chosen, the curves, and where the time went."""
    heads = [[" ".join([r["kind"], *(f"{k}={v}" for k, v in r.get("params", {}).items())]), f"{r['cv_accuracy']:.1%}", f"{r['cv_log_loss']:.3f}"]
             for r in cfg.get("head_selection", [])]
    inputs = [[str(r.get("input_size", "")) + (" (chosen)" if r.get("chosen") else ""), f"{r['crop_pct']:g}", f"{r['cv_accuracy']:.1%}",
               f"{r['cv_log_loss']:.3f}"] for r in cfg.get("input_selection") or cfg.get("crop_selection", [])]  # crop_selection: runs
    # saved before the size could be chosen too
    history, png = cfg.get("history") or [], run / "history.png"  # the run's own picture, drawn by save_run
    if not (history and png.is_file()):  # no curve to show, or a folder whose picture was deleted: drawn again
        png = plot_history(history, png)
    timing = cfg.get("timing", {})
    said = None
    if timing:
        t = [f"{timing['embeddings_computed']} embeddings computed"] if "embeddings_computed" in timing else []
        t += [f"{label} {timing[k]:.1f} s" for label, k in (("extraction", "extract_s"), ("head", "head_s"), ("total", "total_s")) if k in timing]
        said = ", ".join(t)
    folds = {r["folds"] for r in cfg.get("head_selection", []) if "folds" in r}  # absent from runs saved before it was kept
    return {"heads": heads, "chosen": str(cfg.get("head", {}).get("kind")), "one_se": _one_se(cfg), "untried": _untried(cfg), "inputs": inputs,
            "folds": folds.pop() if len(folds) == 1 else None,
            "curves": _img(png.read_bytes(), "training curves", "plot") if png is not None else None, "timing": said,
            "finetune": _finetune_choice(cfg.get("stages", {}).get("finetune", {}).get("selection"))}


def _finetune_choice(sel: dict[str, Any] | None) -> str | None:
    """Which photos decided whether the fine-tuned network or the frozen head was kept (``--cache-bottom``)."""
    if not sel:
        return None
    if sel.get("skipped"):
        return f"Fine-tuning was not run: {sel['skipped']} ({sel['fit_photos']}); the frozen head is kept. The validation split chose nothing."
    better = sel["epoch"] > 0 if sel.get("loop") == "per-epoch" else sel["loss_after"] < sel["loss_before"]  # what was kept
    if sel.get("loop") == "per-epoch":  # the epoch loop trains on the other photos and keeps its best epoch
        kept = f"the fine-tuned network of epoch {sel['epoch']} (trained on those {sel['fit_photos']})" if better else "the frozen head"
        after = "at its best epoch"
    elif "blend" in sel:  # the held-out photos chose a share of the fine-tuned weights (finetune.blend, WiSE-FT)
        share = sel["blend"]
        kept = ("the frozen head" if share == 0 else "the fine-tuned network (retrained on all training photos)" if share == 1 else
                f"a blend of {share:g} fine-tuned and {1 - share:g} starting weights (WiSE-FT; retrained on all training photos)")
        blends = ", ".join(f"{a}: {v:.3f}" for a, v in sel["blends"].items() if a not in ("0", "1"))
        return (f"Fine-tuning (head rate {sel['lr']:.2g}, from {sel['lr_source']}) was judged on {sel['held_out_photos']} training "
                f"photos held out from a run on the other {sel['fit_photos']}: {_loss_word(sel)} {sel['loss_before']:.3f} with the head "
                f"refitted on those, {sel['loss_finetuned']:.3f} fine-tuned, and for blends of the two ({blends}); kept: {kept}. "
                "The validation split chose nothing.")
    else:
        kept = "the fine-tuned network (retrained on all training photos)" if better else "the frozen head"
        after = "after fine-tuning"
    return (f"Fine-tuning (head rate {sel['lr']:.2g}, from {sel['lr_source']}) was judged on {sel['held_out_photos']} training photos "
            f"held out from a run on the other {sel['fit_photos']}: {_loss_word(sel)} {sel['loss_before']:.3f} with the head refitted on "
            f"those, {sel['loss_after']:.3f} {after}; kept: {kept}. The validation split chose nothing.")


def _loss_word(sel: dict[str, Any]) -> str:
    """What the held-out photos were scored by: cross-entropy, or cross-entropy at the best temperature."""
    return "calibrated loss (cross-entropy at the best temperature)" if sel.get("loss") == "calibrated" else "loss"


def _untried(cfg: dict[str, Any]) -> str | None:
    """Why ``--head auto`` left a head type out of its search: too few training photos in a class (``min_photos``)."""
    if cfg.get("train_config", {}).get("head", "auto") != "auto":
        return None
    tried = {r["kind"] for r in cfg.get("head_selection", [])} | {cfg.get("head", {}).get("kind")}
    left = [(k, t.min_photos) for k, t in HEADS.items() if t.min_photos > 1 and k not in tried]
    return " ".join(f"The {k} head was not tried: it needs {n} training photos in every class, and a class has fewer "
                    "(with so few, cross-validation cannot tell it from noise)." for k, n in left) or None


def _one_se(cfg: dict[str, Any]) -> str | None:
    """Why the chosen head is not the table's top row, when it is not: the one-standard-error rule (heads.chosen)."""
    table, kind = cfg.get("head_selection", []), cfg.get("head", {}).get("kind")
    top = max(table, key=cv_rank, default=None)
    if top is None or top["kind"] == kind or "cv_se" not in top:
        return None
    return (f"{top['kind']} led by less than one standard error of its cross-validated accuracy (±{top['cv_se']:.1%}), "
            f"so the simpler {kind} head is kept: a lead that small is noise")


def _member(m: dict[str, Any]) -> dict[str, str]:
    """One ensemble member's row: its accuracy on each split it was measured on, and the run it came from."""
    return {"backbone": m["backbone"], "run": m["run"],
            **{split: f"{m[split]['accuracy']:.1%}" if split in m else "" for split in ("val", "test")}}


def _split(run: Path, name: str, m: dict[str, Any], overlay: ErrorOverlay | None) -> dict[str, Any]:
    """One evaluated split: the per-class table, the confusion matrix (drawn if missing), the worst errors."""
    png = _split_file(run, name, "confusion_matrix.png")
    if not png.is_file():
        plot_confusion(np.asarray(m["confusion_matrix"]), m["classes"], png)
    absent = m.get("absent", [])
    per_class = [[c, "–", "–", "–", "0 (none in this split)"] if c in absent else
                 [c, f"{r['precision']:.3f}", f"{r['recall']:.3f}", f"{r['f1-score']:.3f}", int(r["support"])]
                 for c, r in m.get("per_class", {}).items()]
    return {"name": name, "per_class": per_class, "confusion": _img(png.read_bytes(), f"confusion matrix ({name})", "plot cm"),
            "errors": [_error(run, e, overlay) for e in m.get("worst_errors", [])]}


def _error(run: Path, e: dict[str, Any], overlay: ErrorOverlay | None) -> dict[str, Any]:
    """One worst error's card: the photo's thumbnail (kept in the run folder) and, if asked, its overlay."""
    photo = Path(e["path"])
    thumb = thumbnail(run, photo)
    pictures = [_img(thumb, photo.name, "thumb", "image/jpeg")] if thumb else []
    if overlay is not None and photo.is_file():
        try:
            pictures.append(_img(_jpeg(overlay(photo)), f"{photo.name} overlay", "thumb", "image/jpeg"))
        except Exception as err:  # noqa: BLE001 - an optional picture must not cost the whole report
            log.warning("report: no overlay for %s (%s)", photo, err)
    return {"pictures": pictures, "missing": thumb is None, "name": photo.name, "path": str(photo),
            "predicted": e["predicted"], "confidence": f"{e['confidence']:.0%}", "true": e["true"], "p_true": f"{e.get('p_true', 0):.0%}"}


def thumbnail(run: Path, photo: Path) -> bytes | None:
    """A small JPEG of ``photo``, kept in the run's own store ``run/thumbnails/`` (keyed by the photo's path) so
    the report can be rebuilt after the photos moved."""
    store, name = cache.Store(run / "thumbnails"), hashlib.sha1(str(photo).encode()).hexdigest()[:16]
    try:
        img = open_rgb(photo, THUMB)
    except ValueError:
        return store.read_bytes(name, ".jpg")
    img.thumbnail((THUMB, THUMB))
    data = _jpeg(img)
    store.write_bytes(name, ".jpg", data)
    return data


def render_page(template: str, page: dict[str, Any], path: Path) -> Path:
    """Another self-contained page (``audit.html``) from the same templates, autoescaped, written atomically."""
    atomic_write_text(path, _templates().get_template(template).render(page))
    return path


def jpeg_thumbnail(img: Image.Image) -> bytes:
    """A small JPEG (at most ``THUMB`` px) of a decoded picture, for embedding in a page."""
    return _jpeg(img)


def picture(data: bytes, alt: str, cls: str, mime: str = "image/png") -> dict[str, str]:
    """A picture for a template, embedded as a data URI."""
    return _img(data, alt, cls, mime)


def _jpeg(img: Image.Image) -> bytes:
    img = to_rgb(img)
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def _img(data: bytes, alt: str, cls: str, mime: str = "image/png") -> dict[str, str]:
    """A picture for the template: embedded as a data URI so the page needs no other file."""
    return {"src": f"data:{mime};base64,{base64.b64encode(data).decode()}", "alt": alt, "cls": cls}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise HeadstartError(f"cannot read '{path}' ({e}): the run folder is incomplete; train again to rebuild it") from None
