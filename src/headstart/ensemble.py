"""Ensembles: several runs trained on the same photos and classes, their class probabilities averaged.

Backbones pretrained differently make different mistakes, so averaging them beats each alone once the
features are cached. Measured on the clothing photos, whole frame, logistic-regression heads, cross-validated
on the training split: Lite0 85.3 %, Lite1 86.4 %, their average 87.0 % (validation 88.9 %, test 89.3 %).

An ensemble folder is self-contained: each member's bundle is copied into ``members/`` and ``ensemble.json``,
written last, names them, so a reader finds a whole ensemble or none. It predicts and evaluates like a single
run (``headstart.load`` returns either); export and Grad-CAM work on one network, so they take a member folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import evaluate
from .data import HeadstartError, scan, train_val_split
from .predict import ENSEMBLE_FILE, Classifier, Ensemble, is_ensemble, load_ensemble, load_run
from .report import build_report

__all__ = ["ENSEMBLE_FILE", "Ensemble", "build", "is_ensemble", "load"]

def build(runs: Sequence[str | os.PathLike | Classifier], out: str | os.PathLike | None = None, progress: bool = False) -> Ensemble:
    """Average the given runs (folders, classifiers, or a comparison folder for its pretrained runs) and measure
    the average on their validation (and test) photos: the same split every member was trained and evaluated
    on, so the numbers compare."""
    runs = [m for r in runs for m in _runs_in(r)]
    if len(runs) < 2:
        raise HeadstartError("an ensemble needs at least two runs")
    taken = [f for f in ("config.json", "leaderboard.json") if out is not None and (Path(out) / f).is_file()]
    if taken:
        raise HeadstartError(f"'{out}' already holds a {'run' if taken[0] == 'config.json' else 'comparison'}: give the ensemble its own --out folder")
    members = [r if isinstance(r, Classifier) else load_run(r) for r in runs]
    _check_members(runs, members)
    ens = Ensemble(members)
    metrics = _measure(ens, progress)
    first = members[0]
    ens.info = {
        "backbone": {"name": " + ".join(m.backbone.spec.name for m in members), "timm_name": ", ".join(m.backbone.spec.timm_name for m in members),
                     "weights_source": "its members"},
        "head": {"kind": f"mean of {len(members)} members' probabilities"},
        "metrics": evaluate.headline(metrics),
        "member_metrics": [{"run": _name(r), "backbone": m.backbone.spec.name, **m.info.get("metrics", {})} for r, m in zip(runs, members)],
        "data": first.info.get("data", {}),
    }
    if out is not None:
        ens.save(out)
        for split, m in metrics.items():
            evaluate.write(m, Path(out), prefix="" if split == "val" else f"{split}_")
        build_report(out)
    return ens


def _check_members(runs: list[Any], members: list[Classifier]) -> None:
    """Members must share classes, photos and split, or their average means nothing."""
    first, name0 = members[0], _name(runs[0])
    for run, m in zip(runs[1:], members[1:]):
        if m.classes != first.classes:
            raise HeadstartError(f"'{_name(run)}' has classes {m.classes}, '{name0}' {first.classes}: ensemble runs trained on the same classes")
        if _listed(m) != _listed(first):
            raise HeadstartError(f"'{_name(run)}' was trained on other photos or another split than '{name0}': "
                                 "train every member on the same folder with the same --seed and --val-fraction")


def _listed(clf: Classifier) -> Any:
    """The photos a run listed per split and class (``counts`` in a run folder written before they were named)."""
    data = clf.info.get("data", {})
    return data.get("listed", data.get("counts"))


def _measure(ens: Ensemble, progress: bool) -> dict[str, dict[str, Any]]:
    """The ensemble's metrics on the members' own validation (and test) split, drawn again as training drew it."""
    first = ens.members[0]
    cfg = first.info.get("train_config", {})
    ds = scan(first.info["data"]["root"], classes=first.classes)
    _, va, te = train_val_split(ds, cfg.get("val_fraction", 0.2), cfg.get("seed", 0))
    metrics: dict[str, dict[str, Any]] = {}
    for split, s in (("val", va), ("test", te)):
        if s is None or not len(s):
            continue
        proba, f = ens.proba(s.paths, progress=progress, root=ds.root)
        kept = [str(p) for p, ok in zip(s.paths, f.ok) if ok]
        metrics[split] = evaluate.evaluate(np.asarray(s.labels)[f.ok], proba, ens.classes, kept, split=f"the {split} split")
    return metrics


def load(folder: str | os.PathLike) -> Ensemble:
    """An ensemble folder written by ``build``; each member is checked as ``headstart.load`` checks a run."""
    return load_ensemble(folder)


def _runs_in(item: str | os.PathLike | Classifier) -> list[str | os.PathLike | Classifier]:
    """A run as given; a comparison folder stands for its finished runs with pretrained weights (the from-scratch
    baseline, far weaker, would only pull the average down)."""
    board = Path(item) / "leaderboard.json" if not isinstance(item, Classifier) else None
    if board is None or not board.is_file():
        return [item]
    rows = json.loads(board.read_text())["rows"]
    return [Path(item) / r["run"] for r in rows if r.get("status") == "ok" and not str(r.get("weights", "")).startswith("random")
            and (Path(item) / r["run"] / "config.json").is_file()]  # a single run: not the comparison's own ensemble


def _name(run: str | os.PathLike | Classifier) -> str:
    return str(run.path) if isinstance(run, Classifier) and run.path else str(run)
