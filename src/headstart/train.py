"""Train a new head on cached backbone features: the first half of the classic transfer-learning recipe.

The head is chosen, not guessed: because features are cached, a few candidate heads (the classic
Dense(256, ReLU) → dropout → softmax, and logistic regression at a few regularisation strengths) are compared
by stratified cross-validation on the training split only; the validation split is never looked at until the
final evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from . import backbones, config, distributed, evaluate, features, report
from .config import TrainConfig
from .data import HeadstartError, Split, scan, summarize, train_val_split
from .files import atomic_path, atomic_write_text
from .predict import Classifier, HeadState, head_logits, softmax

# torch, timm and scikit-learn's estimators are imported where they run: a re-run that the cache answers
# (features, the head's fit, the Grad-CAM pictures) never imports torch, which alone takes longer than its work.

log = logging.getLogger("headstart")

# (kind, parameters) tried by cross-validation when head="auto".
CANDIDATES: list[tuple[str, dict[str, float]]] = [
    ("mlp", {}),
    ("linear", {"C": 0.05}),
    ("linear", {"C": 0.5}),
]


@dataclass
class HeadFit:
    state: HeadState  # the head's tensors as arrays (see predict.head_logits)
    kind: str
    params: dict[str, float]
    epochs: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- heads


def class_weights(y: np.ndarray, n_classes: int, mode: str = "auto") -> np.ndarray | None:
    """Balanced weights when asked, or (auto) when the largest class is over 1.5× the smallest."""
    counts = np.bincount(y, minlength=n_classes).astype(float)
    if mode == "none" or (mode == "auto" and counts.max() <= 1.5 * max(counts[counts > 0].min(), 1)):
        return None
    return len(y) / (n_classes * np.maximum(counts, 1))


def _standardizer(x: np.ndarray) -> HeadState:
    return {"0.mean": x.mean(0).astype(np.float32), "0.std": (x.std(0) + 1e-6).astype(np.float32)}


def fit_linear(x: np.ndarray, y: np.ndarray, n_classes: int, C: float, weights: np.ndarray | None, seed: int) -> HeadFit:
    """scikit-learn's logistic regression on standardised features, stored as the linear head's arrays."""
    from sklearn.linear_model import LogisticRegression

    state = _standardizer(x)
    xs = (x - state["0.mean"]) / state["0.std"]
    cw = {i: float(w) for i, w in enumerate(weights)} if weights is not None else None
    lr = LogisticRegression(C=C, max_iter=3000, class_weight=cw, random_state=seed).fit(xs, y)
    w = np.zeros((n_classes, x.shape[1]), np.float32)
    b = np.zeros(n_classes, np.float32)
    if len(lr.classes_) == 2:  # binary: sklearn keeps one logit; softmax([0, z]) == sigmoid(z)
        w[lr.classes_[1]], b[lr.classes_[1]] = lr.coef_[0], lr.intercept_[0]
    else:
        w[lr.classes_], b[lr.classes_] = lr.coef_, lr.intercept_
        missing = np.setdiff1d(np.arange(n_classes), lr.classes_)
        b[missing] = -1e4  # a class absent from this fold's training data is never predicted
    return HeadFit(state | {"1.weight": w, "1.bias": b}, "linear", {"C": C})


def fit_mlp(
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    cfg: TrainConfig,
    weights: np.ndarray | None,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    epochs: int | None = None,
) -> HeadFit:
    """The classic head, Adam; with validation data, early stopping on its loss keeps the best epoch,
    otherwise it trains for exactly ``epochs``."""
    import torch
    from torch import nn

    from .heads import make_head, to_arrays

    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    head = make_head("mlp", x.shape[1], n_classes, cfg.hidden, cfg.dropout)
    for name, value in _standardizer(x).items():
        head.get_buffer(name).copy_(torch.from_numpy(value))
    opt = torch.optim.Adam(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    w = torch.tensor(weights, dtype=torch.float32) if weights is not None else None
    loss_fn = nn.CrossEntropyLoss(weight=w)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    xv = torch.from_numpy(x_val) if x_val is not None else None
    yv = torch.from_numpy(y_val).long() if y_val is not None else None
    best, best_loss, best_epoch, history = None, math.inf, 0, []
    for epoch in range(1, (epochs or cfg.max_epochs) + 1):
        head.train()
        total = 0.0
        for idx in torch.randperm(len(xt), generator=gen).split(cfg.head_batch_size):
            opt.zero_grad()
            loss = loss_fn(head(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        row = {"epoch": epoch, "train_loss": total / len(xt)}
        if xv is not None:
            head.eval()
            with torch.no_grad():
                out = head(xv)
                row["val_loss"] = float(nn.functional.cross_entropy(out, yv))
                row["val_accuracy"] = float((out.argmax(1) == yv).float().mean())
            if row["val_loss"] < best_loss - 1e-4:
                best, best_loss, best_epoch = copy.deepcopy(head.state_dict()), row["val_loss"], epoch
            elif epoch - best_epoch >= cfg.patience:
                history.append(row)
                break
        history.append(row)
    if best is not None:
        head.load_state_dict(best)
    return HeadFit(to_arrays(head.eval()), "mlp", {"dropout": cfg.dropout, "hidden": cfg.hidden}, best_epoch or len(history), history)


def _proba(state: HeadState, x: np.ndarray) -> np.ndarray:
    return softmax(head_logits(state, x))


def _with_views(x: np.ndarray, y: np.ndarray, idx: np.ndarray, views: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Training rows ``idx`` plus their cached augmented views (views never cross a CV fold)."""
    if not views:
        return x[idx], y[idx]
    return np.concatenate([x[idx]] + [v[idx] for v in views]), np.tile(y[idx], 1 + len(views))


def select_head(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig, views: list[np.ndarray] | None = None) -> tuple[str, dict[str, float], int, list[dict[str, Any]]]:
    """Cross-validate the candidate heads on the training split; returns the winner and the table."""
    from sklearn.model_selection import StratifiedKFold

    views = views or []
    candidates = [c for c in CANDIDATES if cfg.head in ("auto", c[0])]
    folds = min(cfg.cv_folds, int(np.bincount(y).min()))
    if folds < 2:
        kind, params = candidates[0]
        log.info("a class has a single training image: no cross-validation, using the %s head", kind)
        return kind, params, 0, []
    splitter = StratifiedKFold(folds, shuffle=True, random_state=cfg.seed)
    weights = class_weights(y, n_classes, cfg.class_weights)
    table = []
    for kind, params in candidates:
        acc, nll, epochs = [], [], []
        for tr, te in splitter.split(x, y):
            xt, yt = _with_views(x, y, tr, views)
            if kind == "mlp":
                fit = fit_mlp(xt, yt, n_classes, cfg, weights, x[te], y[te])
                epochs.append(fit.epochs)
            else:
                fit = fit_linear(xt, yt, n_classes, params["C"], weights, cfg.seed)
            p = _proba(fit.state, x[te])
            acc.append(float((p.argmax(1) == y[te]).mean()))
            nll.append(float(-np.log(np.clip(p[np.arange(len(te)), y[te]], 1e-7, 1)).mean()))
        table.append({"kind": kind, "params": params, "cv_accuracy": float(np.mean(acc)), "cv_log_loss": float(np.mean(nll)),
                      "epochs": int(round(np.mean(epochs))) if epochs else 0})
    best = max(table, key=cv_rank)
    return best["kind"], best["params"], best["epochs"], table


def cv_rank(row: dict[str, Any]) -> tuple[float, float]:
    """How cross-validation results are ranked: accuracy (to 4 places), then lower log loss."""
    return round(row["cv_accuracy"], 4), -row["cv_log_loss"]


def fit_head(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig, views: list[np.ndarray] | None = None) -> tuple[HeadFit, list[dict[str, Any]]]:
    """Choose a head by cross-validation, then fit it on the whole training split (and its augmented views).

    Both are deterministic in the features, labels and settings, so the outcome is remembered in the cache folder
    (``<cache>/heads/``): a re-run on cached features reads it back instead of repeating the cross-validation.
    """
    path = _fit_path(x, y, n_classes, cfg, views)
    if (known := _read_fit(path)) is not None:
        log.info("head: cross-validation and fit read back from %s", path.with_suffix(".json"))
        return known
    with single_thread(torch_too=cfg.head != "linear"):
        kind, params, epochs, table = select_head(x, y, n_classes, cfg, views)
        weights = class_weights(y, n_classes, cfg.class_weights)
        x, y = _with_views(x, y, np.arange(len(y)), views or [])
        if kind == "mlp":
            fit = fit_mlp(x, y, n_classes, cfg, weights, epochs=max(epochs, 1) if table else 30)
        else:
            fit = fit_linear(x, y, n_classes, params["C"], weights, cfg.seed)
    try:  # arrays first, then the record that names them: a reader finds both or neither
        from safetensors.numpy import save_file

        with atomic_path(path.with_suffix(".safetensors")) as tmp:
            save_file(fit.state, str(tmp))
        record = {"kind": fit.kind, "params": fit.params, "epochs": fit.epochs, "history": fit.history, "table": table}
        atomic_write_text(path.with_suffix(".json"), json.dumps(record))
    except OSError:  # a read-only cache only costs the cross-validation next time
        pass
    return fit, table


# Everything the head's selection and fit depend on, besides the features and labels themselves.
_SELECTION_FIELDS = ("head", "hidden", "dropout", "lr", "weight_decay", "max_epochs", "patience", "head_batch_size", "cv_folds",
                     "class_weights", "seed")


def _fit_path(x: np.ndarray, y: np.ndarray, n_classes: int, cfg: TrainConfig, views: list[np.ndarray] | None) -> Path:
    """``<cache>/heads/<key>`` (``.json`` + ``.safetensors``), the key covering inputs, settings and library versions."""
    from importlib.metadata import version

    libs = [version(p) for p in ("torch", "scikit-learn", "numpy")]
    h = hashlib.sha256(json.dumps([n_classes, CANDIDATES, {k: getattr(cfg, k) for k in _SELECTION_FIELDS}, libs, 2]).encode())
    for a in (x, y, *(views or [])):
        h.update(np.ascontiguousarray(a).tobytes())
    return config.cache_dir(cfg.cache_dir) / "heads" / h.hexdigest()[:24]


def _read_fit(path: Path) -> tuple[HeadFit, list[dict[str, Any]]] | None:
    from safetensors.numpy import load_file

    try:
        r = json.loads(path.with_suffix(".json").read_text())
        fit = HeadFit(load_file(str(path.with_suffix(".safetensors"))), r["kind"], r["params"], r["epochs"], r["history"])
        return fit, r["table"]
    except Exception:  # noqa: BLE001 - absent, partial or damaged: fit again
        return None


@contextlib.contextmanager
def single_thread(torch_too: bool = True) -> Iterator[None]:
    """Head-sized matrices gain nothing from threads, and on a busy CPU thread hand-offs cost 10x or more
    (measured on 2 busy shared cores: the clothing head's cross-validation took 280 s with 2 threads).
    ``torch_too=False`` leaves torch alone (and unimported) when only scikit-learn runs."""
    from threadpoolctl import threadpool_limits

    with contextlib.ExitStack() as stack:
        if torch_too:  # torch's count first: inside threadpool_limits it would read 1 and "restore" that
            import torch

            stack.callback(torch.set_num_threads, torch.get_num_threads())
            torch.set_num_threads(1)
        stack.enter_context(threadpool_limits(1))
        yield


# ------------------------------------------------------------------------------------------------ train


def train(data: str | Path, out: str | Path | None = None, config: TrainConfig | None = None, progress: bool = True,
          resume: bool = False, reuse: bool = False, **overrides: Any) -> Classifier:
    """Folder of labelled photos → trained, evaluated classifier (saved to ``out`` when given).

    ``overrides`` are any ``TrainConfig`` field, e.g. ``train("photos/", backbone="mobilenetv2", finetune=True)``.
    ``resume=True`` continues an interrupted run in ``out`` with the settings it was started with.
    ``reuse=True`` returns the finished run already in ``out`` when it was trained on the same photos (content),
    settings and backbone weights: ``compare`` re-runs cost nothing for the backbones that did not change.

    Under torchrun, every rank runs this same function: extraction is sharded, fine-tuning is data-parallel, each
    rank fits the same deterministic head on the same gathered features, and only rank 0 writes into ``out``.
    """
    distributed.init()
    main = distributed.is_main()
    cfg = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    if resume:
        cfg = _resume_config(out, cfg)
    t0 = time.perf_counter()
    ds = scan(data)
    tr, va, te = train_val_split(ds, cfg.val_fraction, cfg.seed)
    if len(va) == 0:
        raise HeadstartError(f"'{ds.root}' leaves no images for validation: add a val/ folder or more images per class")
    log.info("data: %s (%s layout), %d classes", ds.root, ds.layout, len(ds.classes))

    def load_backbone(crop_pct: float | None) -> backbones.LoadedBackbone:  # headless: the bundle keeps the feature extractor only
        return backbones.load_for_training(cfg.backbone, cfg.weights, seed=cfg.seed, cache_dir=cfg.cache_dir,
                                           input_size=cfg.input_size, crop_pct=crop_pct)

    lb = load_backbone(None if cfg.crop_pct == "auto" else cfg.crop_pct)
    log.info("backbone: %s (timm %s), weights from %s", lb.spec.name, lb.spec.timm_name, lb.source)
    if out is not None and main:  # written once the backbone exists: a refused run leaves no folder behind
        atomic_write_text(Path(out) / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    splits = {"train": tr, "val": va} | ({"test": te} if te is not None and len(te) else {})
    inputs = _inputs_digest(cfg, splits, ds.root, lb.digest) if reuse and out is not None else None
    if inputs is not None and (done := _finished_run(Path(out), inputs)) is not None:
        log.info("reused the finished run in %s (same photos, settings and weights)", out)
        return done
    extract = functools.partial(features.extract_sharded, cache_dir=cfg.cache_dir, batch_size=cfg.batch_size, precision=cfg.precision,
                                runtime=cfg.runtime, workers=cfg.workers, progress=progress, root=ds.root)
    timing: dict[str, float] = {"extract_s": 0.0, "embeddings_computed": 0}
    skipped = list(ds.skipped)
    for s in skipped:
        log.warning("skipped %s: %s", s.path, s.reason)

    from_cache = [0]

    def run_extract(split: Split, backbone: backbones.LoadedBackbone | None = None, **kw: Any) -> features.Features:
        f = extract(split.paths, backbone or lb, **kw)
        timing["extract_s"] += f.seconds
        timing["embeddings_computed"] += f.computed
        from_cache[0] += int(f.ok.sum()) - f.computed
        for s in f.skipped:
            if s not in skipped:
                skipped.append(s)
                log.warning("skipped %s: %s", s.path, s.reason)
        return f

    metrics: dict[str, dict[str, Any]] = {}
    history: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    feats: dict[str, features.Features] = {}
    crop_table: list[dict[str, Any]] = []
    if lb.spec.pretrained and cfg.crop_pct == "auto":
        lb, feats["train"], crop_table = _choose_crop(cfg, tr, len(ds.classes), load_backbone, run_extract)
    if lb.spec.pretrained:
        feats |= {name: run_extract(split) for name, split in splits.items() if name not in feats}
        views = [run_extract(tr, augment_policy=cfg.augment, view=k, seed=cfg.seed).x for k in range(cfg.aug_views)]
        log.info("features: %d computed, %d from cache, %.1f s", timing["embeddings_computed"], from_cache[0], timing["extract_s"])
        y_train = np.asarray(tr.labels)[feats["train"].ok]
        unlearnable = [c for i, c in enumerate(ds.classes) if not (y_train == i).any()]
        if unlearnable:
            raise HeadstartError(
                f"class(es) {', '.join(unlearnable)} have no readable training images (skipped files are listed above): "
                "add readable photos to their training folder, or remove the folder"
            )
        t1 = time.perf_counter()
        fit, table = fit_head(feats["train"].x, y_train, len(ds.classes), cfg, views)
        timing["head_s"] = round(time.perf_counter() - t1, 3)
        log.info("head: %s %s, %s", fit.kind, fit.params, "chosen by cross-validation on train" if len(table) > 1 else "as asked")
        history += [{"stage": "head", **row} for row in fit.history]
        metrics = _evaluate_splits(fit.state, feats, splits, ds.classes)
    else:
        fit = HeadFit({}, "linear", {})  # the scratch net's head: made, seeded, below
    head: Any = fit.state  # arrays, or the torch module once a stage has trained one

    stage = "scratch" if not lb.spec.pretrained else "finetune" if cfg.finetune else None
    info_stages: dict[str, Any] = {}
    if stage:
        if stage == "finetune":
            info_stages["feature_extraction"] = evaluate.headline(metrics)
            log.info("feature extraction: val accuracy %.1f%%; now fine-tuning", 100 * metrics["val"]["accuracy"])
        t2 = time.perf_counter()
        if feats:  # only images that decoded: under DDP every rank must take the same number of steps
            tr = tr.subset(np.flatnonzero(feats["train"].ok).tolist())
        import torch

        from . import finetune
        from .heads import make_head, to_arrays, to_module

        if fit.state:
            start = to_module({"kind": fit.kind, "dim": lb.num_features, "hidden": cfg.hidden, "dropout": cfg.dropout}, len(ds.classes), fit.state)
        else:
            with torch.random.fork_rng():  # the scratch net's head starts from the seed too, not from whatever RNG state
                torch.manual_seed(cfg.seed)
                start = make_head("linear", lb.num_features, len(ds.classes))
        net = finetune.Net(lb.model, start)
        with _checkpoint_dir(out) as ckdir:
            res = finetune.fit(net, tr, va, lb.data_config, cfg, stage=stage, checkpoint_dir=ckdir, resume=resume, progress=progress,
                               resume_hint=f"headstart train {data} --resume {out}")
            history += res.history
            lb = backbones.LoadedBackbone(lb.spec, net.backbone, lb.data_config, f"{lb.source}, {stage} here",
                                          backbones.state_digest(net.backbone.state_dict()), lb.num_features, lb.num_classes)
            feats = {name: run_extract(split) for name, split in splits.items() if name != "train"}
            head = net.head
            metrics = _evaluate_splits(to_arrays(net.head), feats, splits, ds.classes)
            if ckdir is not None and out is not None and main:  # done: the bundle supersedes the checkpoint
                (ckdir / finetune.CHECKPOINT).unlink(missing_ok=True)
        timing[f"{stage}_s"] = round(time.perf_counter() - t2, 3)
        info_stages[stage] = {"unfrozen": res.unfrozen, "best_epoch": res.best_epoch, "epochs_run": sum(r["epoch"] > 0 for r in res.history), **evaluate.headline(metrics)}

    timing["total_s"] = round(time.perf_counter() - t0, 3)
    runtime = feats["val"].runtime if feats else "pytorch"
    info: dict[str, Any] = {
        "head": {"kind": fit.kind, "dim": lb.num_features, "hidden": cfg.hidden, "dropout": cfg.dropout, **fit.params, "epochs": fit.epochs},
        "head_selection": table,
        **({"crop_selection": crop_table} if crop_table else {}),
        "features": {"runtime": runtime, "precision": "fp32" if runtime == "onnxruntime" else features.resolve_precision(cfg.precision)},
        "train_config": cfg.to_dict(),
        "stages": info_stages,
        "data": {"root": str(ds.root), "layout": ds.layout, "classes": ds.classes,
                 "counts": {n: _count(splits[n].labels, ds.classes) for n in splits}, "skipped": [vars(s) for s in skipped]},
        "metrics": evaluate.headline(metrics),
        "history": history,
        "timing": {k: round(v, 3) for k, v in timing.items()},
        **({"inputs_digest": inputs} if inputs else {}),
    }
    clf = Classifier(lb, head, ds.classes, info)
    if out is not None and main:
        save_run(clf, Path(out), metrics, summarize(ds.classes, splits, skipped))
    distributed.barrier()  # every rank returns once the run folder is complete
    return clf


def _choose_crop(cfg: TrainConfig, tr: Split, n_classes: int, load_backbone,
                 run_extract) -> tuple[backbones.LoadedBackbone, features.Features, list[dict[str, Any]]]:
    """``crop_pct="auto"``: timm's centre crop or the whole frame, whichever scores higher in the head's
    cross-validation on the training split (ties keep timm's). Costs a second extraction of the training photos;
    both fits are cached, so the chosen one is read back, not repeated."""
    rows, candidates = [], []
    for crop_pct in (None, 1.0):  # timm's centre crop, the whole frame
        lb = load_backbone(crop_pct)
        f = run_extract(tr, lb)
        _, table = fit_head(f.x, np.asarray(tr.labels)[f.ok], n_classes, cfg)
        if not table:  # too few photos per class to cross-validate: nothing to choose by
            return lb, f, []
        best = max(table, key=cv_rank)
        rows.append({"crop_pct": lb.data_config["crop_pct"], "cv_accuracy": best["cv_accuracy"], "cv_log_loss": best["cv_log_loss"]})
        candidates.append((lb, f))
    pick = max(range(len(rows)), key=lambda i: cv_rank(rows[i]))  # first of equals: timm's
    rows[pick]["chosen"] = True
    log.info("crop: %g chosen by cross-validation on train (%s)", rows[pick]["crop_pct"],
             ", ".join(f"{r['crop_pct']:g}: {100 * r['cv_accuracy']:.1f}%" for r in rows))
    return *candidates[pick], rows


def _inputs_digest(cfg: TrainConfig, splits: dict[str, Split], root: Path, weights_digest: str) -> str:
    """Everything a run's result depends on: settings (less where files go and how many decode workers),
    the starting weights, and every photo's split, label and content."""
    from . import __version__

    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("workers", "cache_dir")}
    h = hashlib.sha256(json.dumps([__version__, settings, weights_digest], sort_keys=True, default=str).encode())
    for name in sorted(splits):
        for path, label in sorted(zip(map(str, splits[name].paths), splits[name].labels)):
            h.update(f"{name}\0{Path(path).relative_to(root)}\0{label}\0{features.file_digest(Path(path))}\n".encode())
    return h.hexdigest()


def _finished_run(out: Path, inputs: str) -> Classifier | None:
    """The complete, intact run in ``out`` made from exactly these inputs, or None."""
    from .predict import CONFIG_FILE, load_run

    try:
        if json.loads((out / CONFIG_FILE).read_text()).get("inputs_digest") != inputs:
            return None
        clf = load_run(out)
    except (OSError, ValueError, HeadstartError):
        return None
    clf.info["reused"] = True  # in memory only: the run folder stays exactly as it was written
    return clf


def _evaluate_splits(head: HeadState, feats: dict[str, features.Features], splits: dict[str, Split], classes: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ("val", "test"):
        f = feats.get(name)
        if f is None or not f.ok.any():
            continue
        y = np.asarray(splits[name].labels)[f.ok]
        kept = [str(p) for p, ok in zip(splits[name].paths, f.ok) if ok]
        out[name] = evaluate.evaluate(y, _proba(head, f.x), classes, kept)
    return out


@contextlib.contextmanager
def _checkpoint_dir(out: str | Path | None) -> Iterator[Path | None]:
    """The run folder's checkpoint/ when there is a run folder (made and removed by rank 0 only, which alone
    writes there; the other ranks only read it when resuming); otherwise a temporary one."""
    if out is not None:
        path = Path(out) / "checkpoint"
        main = distributed.is_main()
        if main:
            path.mkdir(parents=True, exist_ok=True)
        yield path
        if main:
            with contextlib.suppress(OSError):
                path.rmdir()
    else:
        with tempfile.TemporaryDirectory(prefix="headstart-ckpt-") as tmp:
            yield Path(tmp)


def _resume_config(out: str | Path | None, cfg: TrainConfig) -> TrainConfig:
    path = Path(out) / "train_config.json" if out is not None else None
    if path is None or not path.is_file():
        raise HeadstartError(f"nothing to resume in '{out}': it has no train_config.json (start the run without --resume)")
    saved = TrainConfig.from_dict(json.loads(path.read_text()))
    return dataclasses.replace(saved, workers=cfg.workers, cache_dir=cfg.cache_dir)


def _count(labels: list[int], classes: list[str]) -> dict[str, int]:
    c = np.bincount(np.asarray(labels, int), minlength=len(classes))
    return {k: int(v) for k, v in zip(classes, c)}


def save_run(clf: Classifier, out: Path, metrics: dict[str, dict[str, Any]], summary: str) -> None:
    """The bundle plus every readable output of the run, each file written atomically."""
    from .report import plot_history

    clf.save(out)
    for name, m in metrics.items():
        evaluate.write(m, out, prefix="" if name == "val" else f"{name}_")
    atomic_write_text(out / "data_summary.txt", summary + "\n")
    history = clf.info.get("history", [])
    if history:
        keys = list(dict.fromkeys(k for row in history for k in row))
        atomic_write_text(out / "history.csv", evaluate._csv([keys] + [[row.get(k, "") for k in keys] for row in history]))
        atomic_write_text(out / "history.json", json.dumps(history, indent=1))
        plot_history(history, out / "history.png")
    def gradcam(photo: Path):
        from .explain import gradcam_thumbnail

        return gradcam_thumbnail(clf, photo, size=160)

    # report.html from the files just written, with Grad-CAM beside each worst error: where the network looked.
    # The pictures are remembered per model and photo, so a re-run with the same model does not run the network.
    b = clf.backbone
    h = hashlib.sha256(json.dumps(["gradcam", 1, 160, b.spec.timm_name, b.spec.kwargs, b.digest, b.data_config, clf.classes], default=str).encode())
    for k, v in sorted(clf.head_state().items()):
        h.update(k.encode() + np.ascontiguousarray(v).tobytes())
    overlay = report.cached_overlay(gradcam, h.hexdigest(), config.cache_dir(clf.info["train_config"].get("cache_dir")))
    report.build_report(out, error_overlay=overlay)
