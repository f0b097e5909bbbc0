"""``train()``: a folder of labelled photos in, a trained and evaluated classifier out, as named steps.

    scan → split → backbone → extract → fit head → [fine-tune | train from scratch] → evaluate → save

Each step is a plain function taking and returning small dataclasses, so it can be read, tested and cached on its
own. The first half of the classic recipe is the head on cached features: a few candidate heads are compared by
cross-validation on the training split only (``heads.fit``); the validation split is never looked at until the
final evaluation. The second half, fine-tuning, unfreezes the top of the backbone (``finetune.fit``).

A re-run answered by the cache (embeddings, head fit, backbone facts, Grad-CAM pictures) never imports torch:
the steps that need a network import it where they run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image

from . import backbones, cache, distributed, evaluate, features, heads, transforms
from .audit import leaks as find_leaks  # the module: headstart.audit is the function audit()
from .config import HeadstartError, IgnoredSetting, TrainConfig, __version__
from .data import Dataset, Skipped, Split, open_rgb, read_exclude, scan, summarize, tally, train_val_split, without
from .files import atomic_write_text, sha256_file
from .plots import plot_history, plot_lr_find, thumbnail
from .predict import CONFIG_FILE, Classifier, graph_gradcam, load_run
from .report import build_report

log = logging.getLogger("headstart")
GRADCAM_THUMB = 160  # px, the report's Grad-CAM pictures


@dataclass
class Data:
    """The scanned folder and the split every later step works on."""

    ds: Dataset
    splits: dict[str, Split]  # "train", "val" and, when the folder has one, "test"

    @property
    def train(self) -> Split:
        return self.splits["train"]


@dataclass
class Extractor:
    """``features.extract_sharded`` with the run's settings, keeping the tally the run reports: time spent,
    embeddings computed and read from the cache, and every skipped file (each named once)."""

    cfg: TrainConfig
    root: Path
    progress: bool
    skipped: list[Skipped]
    calibration: Any = None  # int8: the training photos its graph is calibrated on (onnx.Calibration)
    seconds: float = 0.0
    computed: int = 0
    from_cache: int = 0

    def __call__(self, split: Split, lb: backbones.LoadedBackbone, **kw: Any) -> features.Features:
        f = features.extract_sharded(split.paths, lb, cache_dir=self.cfg.cache_dir, batch_size=self.cfg.batch_size,
                                     precision=self.cfg.precision, runtime=self.cfg.runtime, workers=self.cfg.workers,
                                     progress=self.progress, root=self.root, calibration=self.calibration, **kw)
        self.seconds += f.seconds
        self.computed += f.computed
        self.from_cache += int(f.ok.sum()) - f.computed
        for s in f.skipped:
            self.note(s)
        return f

    def note(self, s: Skipped) -> None:
        if s not in self.skipped:
            self.skipped.append(s)
            log.warning("skipped %s: %s", s.path, s.reason)


@dataclass
class Outcome:
    """Where training got to: the backbone and head that predict, and how they score."""

    lb: backbones.LoadedBackbone
    head: Any  # the head's arrays, or the torch module once a stage has trained one
    fit: heads.HeadFit
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    feats: dict[str, features.Features] = field(default_factory=dict)
    table: list[dict[str, Any]] = field(default_factory=list)  # the head's cross-validation
    input_table: list[dict[str, Any]] = field(default_factory=list)  # --crop-pct/--input-size auto's choice
    history: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    leaks: dict[str, Any] = field(default_factory=dict)  # audit.leaks: val/test photos with a copy in train


# ------------------------------------------------------------------------------------------------- train


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
    cfg = settings(config, overrides, resume, out)
    t0 = time.perf_counter()
    d = split(data, cfg)
    lb = load_backbone(cfg)
    if out is not None and distributed.is_main():  # written once the backbone exists: a refused run leaves no folder behind
        atomic_write_text(Path(out) / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
    inputs = inputs_digest(cfg, d, lb.digest) if reuse and out is not None else None
    if inputs is not None and (done := finished_run(Path(out), inputs)) is not None:
        log.info("reused the finished run in %s (same photos, settings and weights)", out)
        return done
    extract = Extractor(cfg, d.ds.root, progress, list(d.ds.skipped), calibration(cfg, d))
    for s in extract.skipped:
        log.warning("skipped %s: %s", s.path, s.reason)
    result = fit_head(cfg, d, lb, extract) if lb.spec.pretrained else Outcome(lb, {}, heads.HeadFit({}, "linear", {}))
    stage = "finetune" if cfg.finetune and lb.spec.pretrained else None if lb.spec.pretrained else "scratch"
    if stage:
        result = train_network(cfg, d, result, extract, stage, out, resume, progress, f"headstart train {data} --resume {out}")
    result.timing |= {"extract_s": extract.seconds, "embeddings_computed": extract.computed, "total_s": time.perf_counter() - t0}
    clf = Classifier(result.lb, result.head, d.ds.classes, record(cfg, d, result, extract.skipped, inputs))
    if out is not None and distributed.is_main():
        save_run(clf, Path(out), result.metrics, summarize(d.ds.classes, d.splits, extract.skipped, d.ds.root))
    distributed.barrier()  # every rank returns once the run folder is complete
    return clf


def lr_find(data: str | Path, out: str | Path | None = None, config: TrainConfig | None = None, progress: bool = True,
            **overrides: Any) -> Any:
    """The learning-rate range test of fine-tuning (``headstart lr-find``): the head stage as ``train`` runs it
    (answered by the cache after a first run), then an exponential sweep over the unfrozen top on cached bottom
    activations. Returns ``finetune.LrFind``; with ``out``, writes lr_find.csv and lr_find.png (the suggestion marked)."""
    from . import finetune

    cfg = dataclasses.replace(settings(config, overrides), finetune=True)
    d = split(data, cfg)
    lb = load_backbone(cfg)
    extract = Extractor(cfg, d.ds.root, progress, list(d.ds.skipped), calibration(cfg, d))
    start = fit_head(cfg, d, lb, extract)
    lb = start.lb  # the crop and size the head was fitted at (chosen by cross-validation when "auto")
    train_split = d.train.subset(np.flatnonzero(start.feats["train"].ok).tolist())
    head = heads.to_torch(heads.spec(start.fit.kind, lb.num_features, cfg), len(d.ds.classes), start.fit.state)
    found = finetune.lr_range_test(finetune.Net(lb.model, head), train_split, lb.data_config, cfg, progress)
    log.info("lr-find: %s", found.message)
    if out is not None:
        write_lr_find(found, Path(out), f"lr-find: {d.ds.root.name}, {lb.spec.name}, top {cfg.unfreeze} blocks")
    return found


def write_lr_find(found: Any, out: Path, title: str) -> None:
    """lr_find.csv (rate, smoothed loss) and lr_find.png (the curve, suggestions marked, the one used in red)."""
    rows = [["lr", "smoothed_loss"]] + [[f"{a:.6g}", f"{b:.6g}"] for a, b in zip(found.lrs, found.losses)]
    atomic_write_text(out / "lr_find.csv", evaluate.to_csv(rows))
    if found.lrs:
        plot_lr_find(found.lrs, found.losses, found.suggestions, found.lr, out / "lr_find.png", title)


# ------------------------------------------------------------------------------------------------- steps


def settings(config: TrainConfig | None, overrides: dict[str, Any], resume: bool = False, out: str | Path | None = None) -> TrainConfig:
    """The run's validated settings (a resumed run: the ones it was started with); options that would be ignored
    are said, and an unknown backbone is refused before any photo is listed."""
    cfg = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
    if resume:
        path = Path(out) / "train_config.json" if out is not None else None
        if path is None or not path.is_file():
            raise HeadstartError(f"nothing to resume in '{out}': it has no train_config.json (start the run without --resume)")
        cfg = dataclasses.replace(TrainConfig.from_dict(json.loads(path.read_text())), workers=cfg.workers, cache_dir=cfg.cache_dir)
    backbones.lookup(cfg.backbone)
    for why in cfg.ignored():  # Python's warnings say each once (compare trains many backbones alike)
        warnings.warn(why, IgnoredSetting, stacklevel=3)
    return cfg


def split(data: str | Path, cfg: TrainConfig) -> Data:
    """Scan the folder and draw (or take) its train / validation / test split."""
    ds = scan(data)
    if cfg.exclude:
        listed = read_exclude(cfg.exclude, ds.root)
        ds, left_out = without(ds, listed)
        log.info("exclude: %d of the %d paths listed in %s left out of this run (nothing is deleted)", left_out, len(listed), cfg.exclude)
    tr, va, te = train_val_split(ds, cfg.val_fraction, cfg.seed)
    if len(va) == 0:
        raise HeadstartError(f"'{ds.root}' leaves no images for validation: add a val/ folder or more images per class")
    log.info("data: %s (%s layout), %d classes", ds.root, ds.layout, len(ds.classes))
    return Data(ds, {"train": tr, "val": va} | ({"test": te} if te is not None and len(te) else {}))


def calibration(cfg: TrainConfig, d: Data) -> Any:
    """int8 (asked for, or what ``auto`` runs in ONNX Runtime): the training photos its graph is calibrated on,
    the same sample for every split and for predict (the run records their digests)."""
    if cfg.runtime == "pytorch" or features.ort_precision(cfg.precision) != "int8":
        return None
    return features.calibration_sample(d.train.paths, d.train.labels, seed=cfg.seed)


def load_backbone(cfg: TrainConfig, crop_pct: float | None = None, input_size: int | None = None) -> backbones.LoadedBackbone:
    """The headless backbone with its weights (the bundle keeps the feature extractor only), at the run's crop and
    size, or at ``crop_pct``/``input_size`` where the run leaves them to cross-validation ("auto")."""
    crop_pct = crop_pct if cfg.crop_pct == "auto" else cfg.crop_pct
    input_size = input_size if cfg.size_search else cfg.input_size
    lb = backbones.load_for_training(cfg.backbone, cfg.weights, seed=cfg.seed, cache_dir=cfg.cache_dir,
                                     input_size=input_size, crop_pct=crop_pct)
    log.info("backbone: %s (timm %s), weights from %s", lb.spec.name, lb.spec.timm_name, lb.source)
    return lb


def fit_head(cfg: TrainConfig, d: Data, lb: backbones.LoadedBackbone, extract: Extractor) -> Outcome:
    """Extract every split's embeddings, choose and fit the head on the training split, evaluate it."""
    feats: dict[str, features.Features] = {}
    input_table: list[dict[str, Any]] = []
    if cfg.crop_pct == "auto" or cfg.size_search:
        lb, feats["train"], input_table = choose_input(cfg, d, lb, extract)
    feats |= {name: extract(s, lb) for name, s in d.splits.items() if name not in feats}
    views = [extract(d.train, lb, augment_policy=cfg.augment, view=k, seed=cfg.seed).x for k in range(cfg.aug_views)]
    log.info("features: %d computed, %d from cache, %.1f s", extract.computed, extract.from_cache, extract.seconds)
    leaks = find_leaks(feats, d.splits, d.ds.classes, d.ds.root, cfg)
    if leaks["warning"]:
        log.warning("leak: %s", leaks["warning"])
    y = train_labels(d, feats["train"])
    _say_class_weights(y, d.ds.classes, cfg)
    t = time.perf_counter()
    fit, table = heads.fit(feats["train"].x, y, len(d.ds.classes), cfg, views)
    how = "chosen by cross-validation on train" if len(table) > 1 else (
        "as asked" if table or cfg.head != "auto" else "the first candidate: too few photos per class to cross-validate")
    log.info("head: %s %s, %s", fit.kind, fit.params, how)
    spec = heads.spec(fit.kind, lb.num_features, cfg)
    return Outcome(lb, fit.state, fit, evaluate_splits(spec, fit.state, feats, d, d.ds.classes, cfg.cache_dir), feats, table, input_table,
                   [{"stage": "head", **row} for row in fit.history], timing={"head_s": round(time.perf_counter() - t, 3)}, leaks=leaks)


def _say_class_weights(y: np.ndarray, classes: list[str], cfg: TrainConfig) -> None:
    """Imbalanced classes change the loss: say so, and how to choose otherwise."""
    counts = np.bincount(y, minlength=len(classes))
    if heads.class_weights(y, len(classes), cfg.class_weights) is None:
        return
    big, small = int(counts.argmax()), int(counts.argmin())
    log.info("class weights: balanced (%s) — '%s' has %d training photos, '%s' %d; each class counts alike in the loss "
             "(--class-weights none to weigh every photo alike)", cfg.class_weights, classes[big], counts[big], classes[small], counts[small])


def train_labels(d: Data, f: features.Features) -> np.ndarray:
    """The labels of the training photos that decoded; a class left without any is refused by name."""
    y = np.asarray(d.train.labels)[f.ok]
    unlearnable = [c for i, c in enumerate(d.ds.classes) if not (y == i).any()]
    if unlearnable:
        raise HeadstartError(
            f"class(es) {', '.join(unlearnable)} have no readable training images (skipped files are listed above): "
            "add readable photos to their training folder, or remove the folder"
        )
    return y


def input_sizes(own: int) -> list[int]:
    """The sizes ``input_size="auto"`` tries: the backbone's own and about 8/7 and 9/7 of it, in multiples of 32
    (224 → 256, 288; 299 → 352, 384): the range where FixRes found the test-time gains of a network trained on
    random-resized crops, and where BiT fine-tunes."""
    return list(dict.fromkeys([own, *(32 * round(own * k / 7 / 32) for k in (8, 9))]))


def choose_input(cfg: TrainConfig, d: Data, lb: backbones.LoadedBackbone, extract: Extractor) -> tuple[backbones.LoadedBackbone, features.Features, list[dict[str, Any]]]:
    """``crop_pct="auto"`` (timm's centre crop or the whole frame) and the size search (``TrainConfig.size_search``:
    ``input_sizes``): every combination's training photos are embedded and the heads cross-validated on them; the
    best by ``cv_rank`` is used (ties keep the first: timm's crop, the backbone's own size). ``lb`` is the backbone at
    its own crop and size. Costs an extraction of the training photos per combination on a first run; every fit is
    cached, so the chosen one is read back, not repeated."""
    crops = (None, 1.0) if cfg.crop_pct == "auto" else (cfg.crop_pct,)
    # the own size as None: the backbone train() already loaded, not a second cache entry of its weights keyed by "224"
    sizes = [None, *input_sizes(lb.data_config["input_size"][-1])[1:]] if cfg.size_search else [None]
    rows, tried = [], []
    for size in sizes:
        for crop_pct in crops:
            lb = load_backbone(cfg, crop_pct, size)
            f = extract(d.train, lb)
            _, table = heads.fit(f.x, np.asarray(d.train.labels)[f.ok], len(d.ds.classes), cfg)
            if not table:  # too few photos per class to cross-validate: nothing to choose by (the first candidate's)
                return lb, f, []
            best = heads.chosen(table)  # the head this input would be used with
            rows.append({"input_size": lb.data_config["input_size"][-1], "crop_pct": lb.data_config["crop_pct"],
                         "cv_accuracy": best["cv_accuracy"], "cv_log_loss": best["cv_log_loss"]})
            tried.append((lb, f))
    pick = max(range(len(rows)), key=lambda i: heads.cv_rank(rows[i]))  # first of equals
    rows[pick]["chosen"] = True
    log.info("input: %d px, crop %g chosen by cross-validation on train (%s)", rows[pick]["input_size"], rows[pick]["crop_pct"],
             ", ".join(f"{r['input_size']} px crop {r['crop_pct']:g}: {100 * r['cv_accuracy']:.1f}% (log loss {r['cv_log_loss']:.3f})" for r in rows))
    return *tried[pick], rows


def train_network(cfg: TrainConfig, d: Data, start: Outcome, extract: Extractor, stage: str, out: str | Path | None,
                  resume: bool, progress: bool, resume_hint: str) -> Outcome:
    """Fine-tune the backbone's top with the fitted head (``stage="finetune"``), or train the from-scratch baseline
    (``"scratch"``); then evaluate the trained network. Fine-tuning runs on cached bottom activations
    (``cache_bottom``), otherwise the per-epoch loop checkpoints every epoch into the run folder."""
    from . import finetune

    t = time.perf_counter()
    net, train_split = start_network(cfg, d, start, extract, stage)
    cached = stage == "finetune" and cfg.cache_bottom and not distributed.active()
    if stage == "finetune" and cfg.cache_bottom and distributed.active():
        log.info("finetune: under torchrun the per-epoch loop runs (DistributedDataParallel); cached activations are one process's")
    if cached and resume:
        log.info("finetune: nothing to resume on cached activations; the cache makes the run again cheap")
    lb, feats, metrics = start.lb, start.feats, start.metrics
    with checkpoint_dir(None if cached else out) as ckdir:
        if cached:
            res, found = finetune.fit_top(net, train_split, d.splits["val"], lb.data_config, cfg, refit_head(cfg, d, start), progress)
            start.stages["lr_find"] = vars(found) if found else None
        else:
            res = fit_per_epoch(cfg, d, start, net, train_split, stage, ckdir, resume, progress, resume_hint)
        if not (stage == "finetune" and res.best_epoch == 0):  # else the network is the frozen one: its features and metrics stand
            lb, feats, metrics = evaluate_network(cfg, d, start, net, extract, stage)
        if ckdir is not None and out is not None and distributed.is_main():  # done: the bundle supersedes the checkpoint
            (ckdir / finetune.CHECKPOINT).unlink(missing_ok=True)
    stages = {k: v for k, v in start.stages.items() if v is not None} | {stage: stage_record(res, stage, metrics)}
    if stage == "finetune" and res.best_epoch == 0:
        _say_head_kept(res, stages[stage]["epochs_run"], time.perf_counter() - t)
    return dataclasses.replace(start, lb=lb, head=net.head, metrics=metrics, feats=feats, history=start.history + res.history,
                               stages=stages, timing=start.timing | {f"{stage}_s": round(time.perf_counter() - t, 3)})


def fit_per_epoch(cfg: TrainConfig, d: Data, start: Outcome, net: Any, train_split: Split, stage: str, ckdir: Path | None,
                  resume: bool, progress: bool, resume_hint: str) -> Any:
    """The per-epoch loop on the training photos less a held-out part (``ft_holdout``, stratified and seeded), which
    chooses the kept epoch; fine-tuning starts from the head refitted without those photos, so its epoch 0 is judged
    on photos it never saw either. The validation split is only watched: it is what the run reports."""
    from . import finetune

    fit_i, held_i = finetune.held_out(list(train_split.labels), cfg.ft_holdout, cfg.seed)
    if not held_i and stage == "finetune":  # nothing could judge it: the frozen head stays, as without --finetune
        return finetune.FitResult(selection=finetune.nothing_held_out(len(fit_i)))
    frozen = finetune.state_copy(net.head)
    if stage == "finetune":
        net.head.load_state_dict(refit_head(cfg, d, start)(fit_i).state_dict())
    held = train_split.subset(held_i) if held_i else train_split  # scratch on a handful of photos: judged on what it trains on
    res = finetune.fit(net, train_split.subset(fit_i), held, start.lb.data_config, cfg, stage=stage,
                       watch=d.splits.get("val"), checkpoint_dir=ckdir, resume=resume, progress=progress, resume_hint=resume_hint)
    if stage == "finetune" and res.best_epoch == 0:  # the head fitted on every training photo, not its refit
        net.head.load_state_dict(frozen)
    judged = [r for r in res.history if r.get("stage") == stage and "held_out_loss" in r]
    for r in judged:
        r["checkpoint"] = r.get("epoch") == res.best_epoch  # the history plot marks the kept epoch
    before = judged[0]["held_out_loss"] if judged else math.inf
    after = min((r["held_out_loss"] for r in judged if r.get("epoch", 0) > 0), default=before)
    res.selection = {"held_out_photos": len(held_i), "fit_photos": len(fit_i), "loss_before": before, "loss_after": after,
                     "lr": float(cfg.lr if stage == "scratch" else cfg.ft_lr), "lr_source": "lr" if stage == "scratch" else "ft_lr",
                     "epoch": res.best_epoch, "loop": "per-epoch"}
    return res


def evaluate_network(cfg: TrainConfig, d: Data, start: Outcome, net: Any, extract: Extractor, stage: str) -> tuple[backbones.LoadedBackbone, dict[str, features.Features], dict[str, dict[str, Any]]]:
    """The trained backbone as a bundle's backbone, the val/test embeddings it gives, and its metrics there."""
    lb = start.lb
    lb = backbones.LoadedBackbone(lb.spec, net.backbone, lb.data_config, f"{lb.source}, {stage} here",
                                  backbones.state_digest(net.backbone.state_dict()), lb.num_features, lb.num_classes)
    feats = {name: extract(s, lb) for name, s in d.splits.items() if name != "train"}
    return lb, feats, evaluate_splits(heads.spec(start.fit.kind, lb.num_features, cfg), heads.to_arrays(net.head), feats, d, d.ds.classes, cfg.cache_dir)


def stage_record(res: Any, stage: str, metrics: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """config.json's entry for a training stage: what trained, which epoch was kept and on which photos, its scores."""
    return {"unfrozen": res.unfrozen, "best_epoch": res.best_epoch,
            "epochs_run": sum(r.get("epoch", 0) > 0 and r["stage"] == stage for r in res.history),
            **({"selection": res.selection} if res.selection else {}), **evaluate.headline(metrics)}


def start_network(cfg: TrainConfig, d: Data, start: Outcome, extract: Extractor, stage: str) -> tuple[Any, Split]:
    """The network training starts from (fine-tuning: the backbone with the fitted head; scratch: a seeded linear
    head) and the training photos that decode (under DDP every rank must take the same number of steps)."""
    import torch

    from . import finetune

    lb = start.lb
    if stage == "finetune":
        start.stages["feature_extraction"] = evaluate.headline(start.metrics)
        log.info("feature extraction: val accuracy %.1f%%; now fine-tuning", 100 * start.metrics["val"]["accuracy"])
        train_split = d.train.subset(np.flatnonzero(start.feats["train"].ok).tolist())
        head = heads.to_torch(heads.spec(start.fit.kind, lb.num_features, cfg), len(d.ds.classes), start.fit.state)
    else:
        train_split = readable(d.train, d.ds.root, transforms.decode_size(lb.data_config), extract)
        with torch.random.fork_rng():  # the scratch net's head starts from the seed too, not from whatever RNG state
            torch.manual_seed(cfg.seed)
            head = heads.to_torch(heads.spec("linear", lb.num_features, cfg), len(d.ds.classes))
    return finetune.Net(lb.model, head), train_split


def _say_head_kept(res: Any, epochs: int, seconds: float) -> None:
    """Fine-tuning kept the frozen head: say which photos decided it."""
    sel = res.selection
    if sel.get("skipped"):
        return  # said when it was skipped
    if sel:
        log.warning("fine-tuning%s did not beat the head on the %d held-out training photos (%sloss %.4f → %.4f), so the saved "
                    "model is the frozen backbone with its head, what a run without --finetune gives",
                    ", whole or blended with its start," if "blends" in sel else "", sel["held_out_photos"],
                    "calibrated " if sel.get("loss") == "calibrated" else "", sel["loss_before"], sel.get("loss_finetuned", sel["loss_after"]))
    else:
        log.warning("fine-tuning ran %d epochs (%.0f s) and never beat the starting head, so early "
                    "stopping kept epoch 0: the saved model is the frozen backbone with its head, what a run without "
                    "--finetune gives. On a few hundred photos that is common; a lower --ft-lr or fewer --unfreeze "
                    "blocks may help, or leave --finetune out", epochs, seconds)


def refit_head(cfg: TrainConfig, d: Data, start: Outcome) -> Callable[[list[int]], Any]:
    """The chosen head (same kind and parameters) refitted on some of the training photos: fine-tuning is judged
    against it on the photos it did not see."""
    x, y = start.feats["train"].x, train_labels(d, start.feats["train"])
    n = len(d.ds.classes)

    def fit(idx: list[int]) -> Any:
        kind = heads.HEADS[start.fit.kind]
        data = heads.FitData(x[idx], y[idx], n, heads.class_weights(y[idx], n, cfg.class_weights))
        f = kind.fit(data, cfg, start.fit.params, max(start.fit.epochs, 1) if kind.iterative else None)
        return heads.to_torch(heads.spec(start.fit.kind, x.shape[1], cfg), n, f.state)

    return fit


def readable(split: Split, root: Path, min_size: int, extract: Extractor) -> Split:
    """The photos of ``split`` that decode. Training from scratch extracts no embeddings of its training photos, so
    without this pass nothing would name the unreadable ones, and the run would count them as used."""
    keep = []
    for i, path in enumerate(split.paths):
        try:
            open_rgb(path, min_size)
        except ValueError as e:
            extract.note(Skipped(features.shown_path(path, root), str(e)))
        else:
            keep.append(i)
    return split if len(keep) == len(split) else split.subset(keep)


def evaluate_splits(spec: dict[str, Any], state: heads.HeadState, feats: dict[str, features.Features], d: Data,
                    classes: list[str], cache_dir: str | None) -> dict[str, dict[str, Any]]:
    """Metrics of the head on the validation (and test) features."""
    out = {}
    for name in ("val", "test"):
        f = feats.get(name)
        if f is None or not f.ok.any():
            continue
        y = np.asarray(d.splits[name].labels)[f.ok]
        kept = [str(p) for p, ok in zip(d.splits[name].paths, f.ok) if ok]
        out[name] = evaluate.remembered(y, heads.proba(spec, state, f.x), classes, kept, f"the {name} split", cache_dir)
    return out


def record(cfg: TrainConfig, d: Data, r: Outcome, skipped: list[Skipped], inputs: str | None) -> dict[str, Any]:
    """What the run folder's config.json keeps besides the bundle's own facts (``Classifier.info``)."""
    f = r.feats.get("val")
    runtime = f.runtime if f else "pytorch"
    precision = f.precision if f else features.resolve_precision(cfg.precision)
    return {
        "head": {**heads.spec(r.fit.kind, r.lb.num_features, cfg), **r.fit.params, "epochs": r.fit.epochs},
        "head_selection": r.table,
        **({"input_selection": r.input_table} if r.input_table else {}),
        "features": {"runtime": runtime, "precision": precision, **({"calibration": list(f.calibration)} if f and f.calibration else {})},
        "train_config": cfg.to_dict(),
        "stages": r.stages,
        "data": {"root": str(d.ds.root), "layout": d.ds.layout, "classes": d.ds.classes,
                 **tally(d.ds.classes, d.splits, skipped, d.ds.root), "skipped": [vars(s) for s in skipped]},
        "metrics": evaluate.headline(r.metrics),
        "history": r.history,
        "timing": {k: round(v, 3) for k, v in r.timing.items()},
        **({"inputs_digest": inputs} if inputs else {}),
        **({"leaks": r.leaks} if r.leaks else {}),
    }


# --------------------------------------------------------------------------------------- reuse and resume


def inputs_digest(cfg: TrainConfig, d: Data, weights_digest: str) -> str:
    """Everything a run's result depends on: settings (less where files go and how many decode workers),
    the starting weights, and every photo's split, label and content."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in ("workers", "cache_dir")}
    lines = [f"{name}\0{Path(path).relative_to(d.ds.root)}\0{label}\0{features.file_digest(Path(path))}\n"
             for name in sorted(d.splits) for path, label in sorted(zip(map(str, d.splits[name].paths), d.splits[name].labels))]
    return cache.key(__version__, settings, weights_digest, "".join(lines), length=64)


def finished_run(out: Path, inputs: str) -> Classifier | None:
    """The complete, intact run in ``out`` made from exactly these inputs, or None."""
    try:
        if json.loads((out / CONFIG_FILE).read_text()).get("inputs_digest") != inputs:
            return None
        clf = load_run(out)
    except (OSError, ValueError, HeadstartError):
        return None
    clf.info["reused"] = True  # in memory only: the run folder stays exactly as it was written
    return clf


@contextlib.contextmanager
def checkpoint_dir(out: str | Path | None) -> Iterator[Path | None]:
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


# ------------------------------------------------------------------------------------------------- save


def save_run(clf: Classifier, out: Path, metrics: dict[str, dict[str, Any]], summary: str) -> None:
    """The bundle plus every readable output of the run, each file written atomically, and report.html."""
    clf.save(out)
    cache_dir = clf.info.get("train_config", {}).get("cache_dir")
    for name, m in metrics.items():
        evaluate.write(m, out, prefix="" if name == "val" else f"{name}_", cache_dir=cache_dir)
    atomic_write_text(out / "data_summary.txt", summary + "\n")
    history = clf.info.get("history", [])
    if history:
        keys = list(dict.fromkeys(k for row in history for k in row))
        atomic_write_text(out / "history.csv", evaluate.to_csv([keys] + [[row.get(k, "") for k in keys] for row in history]))
        atomic_write_text(out / "history.json", json.dumps(history, indent=1))
        plot_history(history, out / "history.png", cache_dir)
    found = clf.info.get("stages", {}).get("lr_find")
    if found:
        write_lr_find(SimpleNamespace(**found), out, f"lr-find: {clf.backbone.spec.name}")
    build_report(out, error_overlay=gradcam_overlay(clf))


def gradcam_overlay(clf: Classifier, size: int = GRADCAM_THUMB) -> Callable[[Path], Image.Image]:
    """The report's picture beside each worst error: a Grad-CAM overlay of the photo (where the network looked),
    remembered in ``<cache>/overlays/`` by model and photo content, so a re-run with the same model draws its
    report without running the network (nor importing torch)."""
    b = clf.backbone
    state = clf.head_state()
    model_key = cache.key("gradcam-centred", size, b.spec.timm_name, b.spec.kwargs, b.digest, b.data_config, clf.classes, sorted(state),
                          arrays=tuple(state[k] for k in sorted(state)))
    store = cache.store("overlays", clf.info.get("train_config", {}).get("cache_dir"))

    def overlay(photo: Path) -> Image.Image:
        name = cache.key(model_key, sha256_file(photo), length=32)
        known = store.read(name, ".png", _read_png)
        if known is not None:
            return known
        drawn = graph_gradcam(clf, photo)  # from the cached feature graph, without torch, where it can be
        if drawn is not None:
            img = thumbnail(*drawn, size)
        else:
            from .explain import gradcam_thumbnail  # torch and the network: only when a picture must be drawn

            img = gradcam_thumbnail(clf, photo, size=size).convert("RGB")
        store.write(name, {".png": lambda p: img.save(p, format="PNG")})
        return img

    return overlay


def _read_png(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")
