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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import evaluate, features
from .data import HeadstartError, scan, train_val_split
from .files import atomic_write_text
from .predict import Classifier, Prediction, evaluate_folder, predict_images

ENSEMBLE_FILE = "ensemble.json"
FORMAT = 1


@dataclass(repr=False)
class Ensemble:
    members: list[Classifier]
    info: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __repr__(self) -> str:
        return f"Ensemble({' + '.join(m.backbone.spec.name for m in self.members)}, classes={self.classes}, path={self.path})"

    @property
    def classes(self) -> list[str]:
        return self.members[0].classes

    def proba(self, paths: Sequence[Path], *, engine: str = "pytorch", use_cache: bool = True, progress: bool = False,
              root: Path | None = None) -> tuple[np.ndarray, features.Features]:
        """The members' mean probabilities for the images every member could read (rows follow ``f.ok``)."""
        parts = [m.proba(paths, engine=engine, use_cache=use_cache, progress=progress, root=root) for m in self.members]
        ok = np.logical_and.reduce([f.ok for _, f in parts])
        mean = sum(p[ok[f.ok]] for p, f in parts) / len(parts)
        skipped = list({s.path: s for _, f in parts for s in f.skipped}.values())
        return mean, features.Features(mean, ok, skipped, sum(f.computed for _, f in parts), sum(f.seconds for _, f in parts),
                                       parts[0][1].runtime)

    def predict(self, paths: Sequence[str | os.PathLike], top_k: int = 5, progress: bool = False, engine: str = "pytorch") -> list[Prediction]:
        return predict_images(self, paths, top_k, progress, engine)

    def evaluate(self, folder: str | os.PathLike | None = None, out: str | os.PathLike | None = None, split: str | None = None,
                 progress: bool = False, engine: str = "pytorch") -> dict[str, Any]:
        return evaluate_folder(self, folder, out, split, progress, engine)

    def save(self, folder: str | os.PathLike) -> Path:
        """Members first, then the record that names them."""
        folder = Path(folder)
        names = [f"{i + 1}-{m.backbone.spec.name}" for i, m in enumerate(self.members)]
        for name, m in zip(names, self.members):
            m.save(folder / "members" / name)
        record = {"format": FORMAT, "classes": self.classes, "members": [f"members/{n}" for n in names], **self.info}
        atomic_write_text(folder / ENSEMBLE_FILE, json.dumps(record, indent=2, default=str))
        self.path = folder
        return folder


def build(runs: Sequence[str | os.PathLike | Classifier], out: str | os.PathLike | None = None, progress: bool = False) -> Ensemble:
    """Average the given runs (folders, classifiers, or a comparison folder for its pretrained runs) and measure
    the average on their validation (and test) photos: the same split every member was trained and evaluated
    on, so the numbers compare."""
    from .predict import load

    runs = [m for r in runs for m in _runs_in(r)]
    if len(runs) < 2:
        raise HeadstartError("an ensemble needs at least two runs")
    taken = [f for f in ("config.json", "leaderboard.json") if out is not None and (Path(out) / f).is_file()]
    if taken:
        raise HeadstartError(f"'{out}' already holds a {'run' if taken[0] == 'config.json' else 'comparison'}: give the ensemble its own --out folder")
    members = [r if isinstance(r, Classifier) else load(r) for r in runs]
    first, name0 = members[0], _name(runs[0])
    for run, m in zip(runs[1:], members[1:]):
        if m.classes != first.classes:
            raise HeadstartError(f"'{_name(run)}' has classes {m.classes}, '{name0}' {first.classes}: ensemble runs trained on the same classes")
        if m.info.get("data", {}).get("counts") != first.info.get("data", {}).get("counts"):
            raise HeadstartError(f"'{_name(run)}' was trained on other photos or another split than '{name0}': "
                                 "train every member on the same folder with the same --seed and --val-fraction")
    ens = Ensemble(members)
    cfg = first.info.get("train_config", {})
    ds = scan(first.info["data"]["root"], classes=first.classes)
    _, va, te = train_val_split(ds, cfg.get("val_fraction", 0.2), cfg.get("seed", 0))
    metrics: dict[str, dict[str, Any]] = {}
    for split, s in (("val", va), ("test", te)):
        if s is None or not len(s):
            continue
        proba, f = ens.proba(s.paths, progress=progress, root=ds.root)
        kept = [str(p) for p, ok in zip(s.paths, f.ok) if ok]
        metrics[split] = evaluate.evaluate(np.asarray(s.labels)[f.ok], proba, ens.classes, kept)
    ens.info = {
        "backbone": {"name": " + ".join(m.backbone.spec.name for m in members), "timm_name": ", ".join(m.backbone.spec.timm_name for m in members),
                     "weights_source": "its members"},
        "head": {"kind": f"mean of {len(members)} members' probabilities"},
        "metrics": evaluate.headline(metrics),
        "member_metrics": [{"run": _name(r), "backbone": m.backbone.spec.name, **m.info.get("metrics", {})} for r, m in zip(runs, members)],
        "data": first.info.get("data", {"root": str(ds.root), "classes": ens.classes}),
    }
    if out is not None:
        from .report import build_report

        ens.save(out)
        for split, m in metrics.items():
            evaluate.write(m, Path(out), prefix="" if split == "val" else f"{split}_")
        build_report(out)
    return ens


def load(folder: str | os.PathLike) -> Ensemble:
    """An ensemble folder written by ``build``/``save``; each member is checked as ``headstart.load`` checks a run."""
    from .predict import load as load_run

    folder = Path(folder)
    try:
        record = json.loads((folder / ENSEMBLE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise HeadstartError(f"'{folder / ENSEMBLE_FILE}' cannot be read ({e}); rebuild it with `headstart ensemble`") from None
    if record.get("format") != FORMAT:
        raise HeadstartError(f"'{folder}' was written by an incompatible headstart (ensemble format {record.get('format')})")
    members = [load_run(folder / m) for m in record["members"]]
    info = {k: v for k, v in record.items() if k not in ("format", "classes", "members")}
    return Ensemble(members, info, folder)


def is_ensemble(folder: str | os.PathLike) -> bool:
    return (Path(folder) / ENSEMBLE_FILE).is_file()


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
