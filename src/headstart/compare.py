"""Which pretrained network suits my data? Train each backbone on the same split and rank them.

Every backbone gets an ordinary ``train`` run in ``out/<backbone>/`` (same data, same seed, hence the same
split); the cached features make a re-run cost seconds. The leaderboard adds the numbers people choose a model
by besides accuracy: size, input resolution, extraction throughput, single-photo latency and training time.
A backbone whose weights are not available here is listed as skipped, with the reason, instead of stopping
the comparison.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import statistics
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from .config import TrainConfig
from .backbones import lookup
from .data import HeadstartError
from .files import atomic_write_text
from .predict import Classifier
from .ensemble import build as build_ensemble
from .pipeline import train
from .plots import plot_leaderboard
from .report import TABLE, build_report, cell, columns, format_table

__all__ = ["COLUMNS", "TABLE", "cell", "columns", "compare", "format_table", "rank", "run_folder"]

log = logging.getLogger("headstart")

COLUMNS = [
    "backbone", "rank", "status", "accuracy", "accuracy_low", "accuracy_high", "balanced_accuracy", "macro_f1", "test_accuracy", "params", "input_size",
    "extract_img_s", "extract_note", "predict_ms", "train_s", "head", "weights", "run", "reason",
]
LATENCY_REPEATS = 5  # timed single-photo predictions, after one warm-up; the median is reported
SAMPLE_IMAGES = 16  # images timed for throughput when this run found every embedding in the cache
NO_WEIGHTS = "no pretrained weights"  # how backbones.load's offline error begins
ENSEMBLE_RUN = "ensemble"  # the ensemble's row name and folder


def compare(
    data: str | Path,
    backbones: Sequence[str],
    out: str | Path,
    finetune: bool = False,
    require_pretrained: bool = False,
    progress: bool = True,
    ensemble: bool = False,
    weights: Mapping[str, str | Path] | None = None,
    **overrides: Any,
) -> list[dict[str, Any]]:
    """Train every backbone on ``data``; write ``leaderboard.{csv,json,md}``, the plot and ``report.html``
    into ``out``. Returns the leaderboard rows, best first, skipped backbones last.

    ``overrides`` are ``TrainConfig`` fields shared by all runs (seed, head, cache_dir, ...). ``ensemble`` adds
    a row for the average of the pretrained runs (``out/ensemble``, see ensemble.py): what combining them buys,
    at what cost. ``weights`` maps a backbone name to its local weight file (the command line's
    ``--weights mobilenetv2=FILE``); the others are found as ``headstart train`` finds them.
    """
    out = Path(out)
    names = _validate(backbones, overrides, finetune)
    weights = _weights_for(names, weights or {})
    earlier = _earlier_rows(out)
    rows, members = [], []
    for name in names:
        log.info("compare: %s", name)
        kwargs = dict(overrides, backbone=name) | ({"finetune": True} if finetune else {})
        if name in weights:
            kwargs["weights"] = str(weights[name])
        run = out / run_folder(name)
        try:
            clf = train(data, out=run, progress=progress, reuse=True, **kwargs)
        except HeadstartError as e:
            if require_pretrained or not str(e).startswith(NO_WEIGHTS):
                raise
            reason = str(e).replace("--weights PATH", f"--weights {name}=PATH")  # compare's option names the backbone
            log.warning("compare: skipping %s: no pretrained weights here (the reason and the fix are in its leaderboard row)", name)
            rows.append({"backbone": name, "status": "skipped: no weights", "reason": reason})
            continue
        rows.append(_row(name, clf, run, earlier.get(name)))
        if clf.backbone.spec.pretrained:
            members.append((clf, rows[-1]))
    if ensemble and len(members) >= 2:
        rows.append(_ensemble_row(members, out / ENSEMBLE_RUN))
    rows = rank(rows)
    write_leaderboard(rows, out)
    build_report(out)
    return rows


def _interval(val: dict[str, Any]) -> dict[str, float | None]:
    """The validation accuracy's 95 % interval as two columns (a spreadsheet reads them as numbers)."""
    lo, hi = val.get("accuracy_ci95") or (None, None)
    return {"accuracy_low": lo, "accuracy_high": hi}


def _ensemble_row(members: list[tuple[Classifier, dict[str, Any]]], folder: Path) -> dict[str, Any]:
    """The pretrained runs averaged: accuracy as measured by ``ensemble.build``, cost as the members' sum."""
    ens = build_ensemble([clf for clf, _ in members], folder)
    val, test = ens.info["metrics"].get("val", {}), ens.info["metrics"].get("test", {})
    photos = _val_photos(folder)
    return {
        "backbone": ENSEMBLE_RUN,
        "status": "ok",
        "accuracy": val.get("accuracy"),
        **_interval(val),
        "balanced_accuracy": val.get("balanced_accuracy"),
        "macro_f1": val.get("macro_f1"),
        "test_accuracy": test.get("accuracy"),
        "params": sum(r["params"] for _, r in members),
        "extract_note": "its members'",
        "predict_ms": predict_latency(ens, photos[0]) if photos else None,
        "train_s": round(sum(r["train_s"] or 0 for _, r in members), 3),
        "head": ens.info["head"]["kind"],
        "weights": " + ".join(r["backbone"] for _, r in members),
        "run": ENSEMBLE_RUN,
    }


def run_folder(name: str) -> str:
    """A backbone name as a folder name (timm names may hold characters a file system dislikes)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _validate(names: Sequence[str], overrides: dict[str, Any], finetune: bool) -> list[str]:
    """Fail before the first (long) run: no names, unknown names, or options train would not accept."""
    if isinstance(names, str):
        names = names.split(",")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise HeadstartError("compare needs at least one backbone: --backbones efficientnet_lite0,efficientnet_lite1")
    if len(set(names)) != len(names):
        raise HeadstartError(f"a backbone is listed twice in {', '.join(names)}")
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(overrides) - known) + (["finetune"] if finetune and "finetune" not in known else [])
    if "backbone" in overrides:
        unknown.append("backbone (give the list as backbones=)")
    if "weights" in overrides:
        unknown.append("weights (give one file per backbone as weights={name: file})")
    if unknown:
        raise HeadstartError(f"compare: unknown training option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    for n in names:
        lookup(n)
    return names


def _weights_for(names: list[str], weights: Mapping[str, str | Path]) -> dict[str, str | Path]:
    """``weights`` keyed by the names as listed (any spelling lookup accepts), checked before the first run: a name
    not compared is an error (its file would be silently unused), and so is a missing file (found only after the
    backbones before it had trained)."""
    canonical = {lookup(n).name: n for n in names}
    out = {}
    for key, path in weights.items():
        name = canonical.get(lookup(key).name)
        if name is None:
            raise HeadstartError(f"--weights {key}={path}: '{key}' is not among the compared backbones ({', '.join(names)})")
        if not Path(path).is_file():
            raise HeadstartError(f"--weights {key}={path}: no such file '{path}'")
        out[name] = path
    return out


def _row(name: str, clf: Classifier, run: Path, earlier: dict[str, Any] | None) -> dict[str, Any]:
    info = clf.info
    val, test = info["metrics"].get("val", {}), info["metrics"].get("test", {})
    timing = info["timing"]
    photos = _val_photos(run)
    latency = predict_latency(clf, photos[0]) if photos else None
    img_s, note = _throughput(clf, timing, earlier, photos)
    params = sum(p.numel() for p in clf.backbone.model.parameters()) + sum(p.numel() for p in clf.head.parameters())
    return {
        "backbone": name,
        "status": "ok",
        "accuracy": val.get("accuracy"),
        **_interval(val),
        "balanced_accuracy": val.get("balanced_accuracy"),
        "macro_f1": val.get("macro_f1"),
        "test_accuracy": test.get("accuracy"),
        "params": int(params),
        "input_size": int(clf.backbone.data_config["input_size"][-1]),
        "extract_img_s": img_s,
        "extract_note": note,
        "predict_ms": latency,
        "train_s": timing.get("total_s"),
        "head": info["head"]["kind"],
        "weights": clf.backbone.source,
        "run": run.name,
        **({"reused": True} if info.get("reused") else {}),
    }


def _val_photos(run: Path) -> list[str]:
    """Validation photos that decoded, in the run's own order: a fixed sample for the timings."""
    try:
        with open(run / "predictions.csv", newline="") as f:
            return [r["path"] for r in csv.DictReader(f)]
    except OSError:
        return []


def predict_latency(clf: Classifier, photo: str | Path, repeats: int = LATENCY_REPEATS) -> float:
    """Median milliseconds for ``clf.predict([photo])``: decode, preprocess, backbone, head, as a user calls it."""
    clf.predict([photo])  # warm-up: first-call allocations and kernel selection are not latency
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        clf.predict([photo])
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1000, 2)


def _throughput(clf: Classifier, timing: dict[str, Any], earlier: dict[str, Any] | None, photos: list[str]) -> tuple[float | None, str]:
    """Extraction images/s, measured honestly: a run that found its embeddings in the cache did no extraction.

    Taken from this run when it computed most embeddings; else from the earlier leaderboard in the same folder
    (measured when that run computed them); else timed on a fixed sample of validation photos, uncached.
    """
    computed, seconds = timing.get("embeddings_computed", 0), timing.get("extract_s", 0.0)
    data = clf.info["data"]
    total = sum(sum(c.values()) for c in data.get("used", data.get("counts", {})).values())  # "counts": an older run
    if computed >= max(SAMPLE_IMAGES, total // 2) and seconds > 0:
        return round(computed / seconds, 2), f"this run ({computed} images)"
    if earlier and earlier.get("extract_img_s") and earlier.get("input_size") == clf.backbone.data_config["input_size"][-1]:
        note = str(earlier.get("extract_note", ""))
        return earlier["extract_img_s"], note if note.startswith("earlier") else "earlier " + note.removeprefix("this ")
    sample = photos[:SAMPLE_IMAGES]
    if not sample:
        return None, "not measured"
    t = time.perf_counter()
    f = clf.features(sample, use_cache=False, batch_size=len(sample))
    return round(int(f.ok.sum()) / (time.perf_counter() - t), 2), f"sample ({len(sample)} images, uncached)"


def _earlier_rows(out: Path) -> dict[str, dict[str, Any]]:
    try:
        return {r["backbone"]: r for r in json.loads((out / "leaderboard.json").read_text())["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best validation accuracy first (ties: macro-F1, then the faster model); skipped backbones last."""
    done = sorted((r for r in rows if r["status"] == "ok"),
                  key=lambda r: (-(r["accuracy"] or 0), -(r["macro_f1"] or 0), r["predict_ms"] or float("inf")))
    for i, r in enumerate(done, 1):
        r["rank"] = i
    return done + [r for r in rows if r["status"] != "ok"]


def write_leaderboard(rows: list[dict[str, Any]], out: Path) -> None:
    """``leaderboard.csv`` (backbone first), ``.json`` and ``.md``, plus the accuracy-vs-latency plot."""
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(out / "leaderboard.csv", buf.getvalue())
    atomic_write_text(out / "leaderboard.json", json.dumps({"columns": COLUMNS, "rows": rows}, indent=2))
    atomic_write_text(out / "leaderboard.md", format_table(rows, markdown=True))
    plot_leaderboard(rows, out / "accuracy_vs_latency.png")
