"""One place for the defaults and their rules: hyper-parameters and the values each may take, the error type,
the version, where caches live and where shared assets are found.

The bottom layer: it imports nothing from headstart (and nothing heavy), so a config is checked, and a bad value
refused, before any photo is read or torch is imported.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Literal, get_args, get_origin, get_type_hints

__version__ = "0.1.0"
DEFAULT_BACKBONE = "efficientnet_lite0"
DEFAULT_FT_LR = 1e-3  # the fine-tuning rate, and what --ft-lr auto keeps when the lr-find curve says nothing
# cv_folds="auto": folds of the head's cross-validation, fewer from a size on. Every training photo is held out once
# either way, so the estimate still rests on all of them; what fewer folds change is each fit's share of the photos
# (two thirds instead of four fifths), which matters less the more photos there are, while the search's cost is
# folds x fit size: 3 folds halve it (BENCHMARKS.md, "The head's search at 3 000 photos").
CV_FOLDS, CV_FOLDS_LARGE, CV_LARGE_ROWS = 5, 3, 2000
# headstart audit: two photos are near copies at this copy similarity (audit.copy_similarity); measured in BENCHMARKS.md.
AUDIT_NEAR = 0.75

# Augmentation policies (transforms.py builds them), combined with "+": named here so a config is checked without torch.
POLICIES = ("none", "classic", "rrc", "randaugment", "erasing")

Head = Literal["auto", "mlp", "linear"]
ClassWeights = Literal["auto", "none", "balanced"]
Precision = Literal["auto", "bf16", "fp32", "int8"]
Runtime = Literal["auto", "onnxruntime", "pytorch"]


class HeadstartError(Exception):
    """An error a person can act on: printed without a traceback by the CLI."""


class IgnoredSetting(UserWarning):
    """A setting the run will not use (``TrainConfig.ignored``), warned about so it is noticed, not trusted."""


class ConfigError(HeadstartError):
    """A ``TrainConfig`` value refused at entry; ``field`` lets the CLI name the option the user typed."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Range:
    """The numbers a field accepts; ``describe()`` is the hint an error message gives."""

    low: float | None = None
    high: float | None = None
    whole: bool = False  # integers only
    low_open: bool = False  # ``low`` itself is refused
    high_open: bool = False

    def __contains__(self, x: float) -> bool:
        above = self.low is None or (x > self.low if self.low_open else x >= self.low)
        below = self.high is None or (x < self.high if self.high_open else x <= self.high)
        return above and below

    def describe(self) -> str:
        kind = "a whole number" if self.whole else "a number"
        lo, hi = _number(self.low), _number(self.high)
        if hi is None:
            return f"{kind} above {lo}" if self.low_open else f"{kind} of at least {lo}"
        if self.low_open and self.high_open:
            return f"{kind} between {lo} and {hi} (exclusive)"
        if self.high_open:
            return f"{kind} from {lo} up to, not including, {hi}"
        return f"{kind} from {lo} to {hi}"


def _number(x: float | None) -> str | None:
    """A bound as people write it: 1, 0.3, 4294967295."""
    return None if x is None else str(int(x)) if float(x).is_integer() else f"{x:g}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
COUNT = Range(1, whole=True)  # epochs, patience, batch sizes: 0 would mean no work at all
CROP_PCT = Range(0.3, 1.0)
CROP_PCT_HINT = "give a number from 0.3 to 1.0 (1.0 = the whole frame), or auto"

# The numbers each numeric field accepts, read off how the field is used (pipeline.py, heads.py, finetune.py, features.py).
RANGES: dict[str, Range] = {
    "input_size": Range(32, 1024, whole=True),  # or None: the backbone's own
    "hidden": COUNT,
    "dropout": Range(0, 1, high_open=True),
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "max_epochs": COUNT,
    "patience": COUNT,
    "overfit_stop": POSITIVE,
    "batch_size": COUNT,
    "head_batch_size": COUNT,
    "val_fraction": Range(0, 1, low_open=True, high_open=True),  # 0 leaves no validation, 1 nothing to train on
    "cv_folds": Range(2, whole=True),  # one fold is no cross-validation
    "workers": Range(-1, whole=True),  # -1: one per spare core; 0: decode in the calling thread
    "seed": Range(0, 2**32 - 1, whole=True),  # what scikit-learn's random_state and NumPy's seeding accept
    "top_k": COUNT,
    "unfreeze": Range(0, whole=True),  # 0: only the head trains
    "unfreeze_layers": Range(0, whole=True),  # 0: unfreeze decides
    "ft_lr": POSITIVE,  # or "auto"
    "ft_views": Range(0, whole=True),
    "ft_holdout": Range(0.05, 0.5),
    "ft_mixup": NON_NEGATIVE,
    "ft_ema": Range(0, 1, high_open=True),
    "backbone_lr_ratio": POSITIVE,
    "ft_epochs": COUNT,
    "ft_patience": COUNT,  # 0 would stop before the first epoch (finetune.fit stops once epoch - best > patience)
    "ft_batch_size": COUNT,
    "ft_weight_decay": NON_NEGATIVE,
    "label_smoothing": Range(0, 1, high_open=True),  # 1 would make every target uniform
    "aug_views": Range(0, whole=True),
    "scratch_epochs": COUNT,
    "scratch_patience": COUNT,
}


@dataclass
class TrainConfig:
    """Every knob of a training run, with the defaults that work first time.

    Saved verbatim into the run folder so a run can be reproduced from its config alone. Every value is checked
    when the config is made (``TrainConfig(...)``, ``dataclasses.replace``, ``from_dict``): a bad one raises a
    ``ConfigError`` naming the field, the value and what is allowed, before any work starts.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # explicit weight file; None = package, then hub
    input_size: int | Literal["auto"] | None = None  # pixels (square) the backbone sees; None = its timm data config, except
    # when fine-tuning, where it means "auto": the backbone's own size or one of two larger, whichever cross-validates best on
    # the training photos (``size_search``; see README)
    crop_pct: float | Literal["auto"] | None = None  # centre crop (timm's): 1.0 = whole shorter side; None = timm's; "auto" = by CV
    head: Head = "auto"  # "auto" (chosen by cross-validation on train), "mlp" or "linear"
    hidden: int = 256  # the classic Dense(256, ReLU)
    dropout: float = 0.5
    lr: float = 1e-3  # Adam, as in the classic recipe
    weight_decay: float = 1e-4
    max_epochs: int = 200  # head epochs are milliseconds on cached features; early stopping ends them
    patience: int = 5  # early stopping ends the head's fit after this many epochs without a better validation loss (15 gave
    # the same cross-validation table on both shared sets and on 3 000 photos, its MLP folds taking 1.5x as long: BENCHMARKS.md)
    overfit_stop: float = 0.1  # ...or once the validation loss is 10 % above its best (Prechelt's GL criterion): overfitting
    batch_size: int = 32  # images per backbone forward pass
    head_batch_size: int = 64
    val_fraction: float = 0.2  # only when the folder has no validation split
    cv_folds: int | Literal["auto"] = "auto"  # "auto": 5, or 3 from 2 000 training photos (cv_folds_for)
    class_weights: ClassWeights = "auto"  # "auto" = balanced when classes are imbalanced, "none", "balanced"
    precision: Precision = "auto"  # "auto" (PyTorch: bf16 where the CPU supports it; ONNX Runtime: fp32), "bf16", "fp32",
    # or "int8": the frozen backbone quantized in ONNX Runtime on the CPU, calibrated on the training photos
    runtime: Runtime = "auto"  # what runs the frozen backbone: "auto" (ONNX Runtime fp32 on a CPU), "onnxruntime", "pytorch"
    channels_last: bool = True  # the memory layout oneDNN's CPU convolutions are fastest with
    # decode workers (threads for extraction, processes for fine-tuning); -1 = one per spare core. ONNX Runtime
    # extraction runs workers + 1 threads, each decoding and running its own batches
    workers: int = -1
    seed: int = 0
    cache_dir: str | None = None
    exclude: str | None = None  # a file of photo paths to leave out (headstart audit's exclude.txt); nothing is deleted
    top_k: int = 5
    # fine-tuning (second stage) and the from-scratch baseline
    finetune: bool = False
    unfreeze: int = 5  # top blocks of the backbone to unfreeze (timm's own block grouping); 5 beat 3 and 7 on held-out
    # training photos (BENCHMARKS.md, "Choosing the fine-tuning defaults")
    unfreeze_layers: int = 0  # the Keras alternative: the last N layers with weights (overrides unfreeze)
    ft_lr: float | Literal["auto"] = DEFAULT_FT_LR  # head learning rate while fine-tuning; "auto": lr-find's valley
    cache_bottom: bool = True  # fine-tune on the frozen bottom's activations, cached once per photo and view (fastai's
    # schedule, fast on a CPU, a blend chosen on held-out photos); False: the per-epoch loop over decoded photos
    # (checkpoints, --resume), which torchrun always runs
    ft_views: int = 2  # augmented views (--augment) per training photo whose bottom activations are cached
    ft_holdout: float = 0.2  # share of the training photos held out to choose what fine-tuning (or the scratch
    # baseline) keeps: a share of the fine-tuned weights, an epoch, or the frozen head; the validation split only reports
    ft_mixup: float = 0.0  # timm Mixup alpha on the cached activations; 0 = off
    ft_ema: float = 0.0  # timm ModelEmaV3 decay of the fine-tuned weights; 0 = off
    backbone_lr_ratio: float = 0.1  # the backbone learns 10x more gently than the head
    ft_epochs: int = 12  # the one-cycle's length on cached activations; the per-epoch loop's most
    ft_patience: int = 3
    ft_batch_size: int = 32
    ft_weight_decay: float = 1e-4
    label_smoothing: float = 0.1  # keeps a useful gradient once the head fits the training set
    train_bn: bool = False  # False keeps BatchNorm running statistics as pretrained
    augment: str = "classic"  # rotation ±20°, shifts 0.2, horizontal flip; or rrc, randaugment, erasing (+ to combine)
    aug_views: int = 0  # augmented views per training image cached for the head stage
    scratch_epochs: int = 40
    scratch_patience: int = 8

    def __post_init__(self) -> None:
        """Refuse a bad value here, at entry, so a run never fails an hour in (or leaves a half-made folder)
        over a typo; numbers are stored as plain int/float and paths as strings, so the config saves as JSON."""
        for f in fields(self):
            setattr(self, f.name, _checked(f.name, getattr(self, f.name)))
        if self.runtime == "onnxruntime" and self.precision == "bf16":
            raise ConfigError("precision", "precision='bf16' cannot go with runtime='onnxruntime', which runs fp32: "
                                           "give precision auto or fp32, or runtime pytorch")
        if self.ft_lr == "auto" and not self.cache_bottom:
            raise ConfigError("ft_lr", "ft_lr='auto' runs lr-find on the cached bottom activations: give cache_bottom=True "
                                       "(--cache-bottom), or a number for ft_lr")
        if self.runtime == "pytorch" and self.precision == "int8":
            raise ConfigError("precision", "precision='int8' cannot go with runtime='pytorch': int8 runs the backbone in "
                                           "ONNX Runtime on the CPU; give runtime auto or onnxruntime, or precision auto, fp32 or bf16")

    def ignored(self) -> list[str]:
        """A sentence for each setting changed from its default that this run would not use (augmentation without
        fine-tuning, say): the pipeline logs them and the CLI prints them, so nothing is dropped silently."""
        why: dict[str, str] = {}

        def unused(names: str, reason: str) -> None:
            for name in names.split():
                why.setdefault(name, reason)

        if _is_scratch(self.backbone):  # what pipeline.train_network and finetune.fit(stage="scratch") read
            unused("finetune unfreeze unfreeze_layers ft_lr backbone_lr_ratio ft_epochs ft_patience train_bn cache_bottom ft_views "
                   "ft_mixup ft_ema",
                   "backbone 'scratch' trains the whole network, BatchNorm included, with lr, scratch_epochs and scratch_patience")
            unused("head hidden dropout weight_decay max_epochs patience overfit_stop head_batch_size cv_folds class_weights aug_views",
                   "backbone 'scratch' has no head stage on cached features")
            if self.crop_pct == "auto":
                unused("crop_pct", "the crop is chosen by the head's cross-validation, which backbone 'scratch' has none of")
            if self.input_size == "auto":
                unused("input_size", "the size is chosen by the head's cross-validation, which backbone 'scratch' has none of")
            if self.weights != "random":
                unused("weights", "backbone 'scratch' starts from random initialisation")
        else:
            unused("scratch_epochs scratch_patience", "it applies to backbone 'scratch' only")
            if self.head == "linear":
                unused("hidden dropout lr weight_decay max_epochs patience overfit_stop head_batch_size",
                       "head='linear' is a logistic regression; this shapes the MLP head")
            if not self.finetune:
                unused("unfreeze unfreeze_layers ft_lr backbone_lr_ratio ft_epochs ft_patience ft_batch_size ft_weight_decay "
                       "label_smoothing train_bn channels_last cache_bottom ft_views ft_holdout ft_mixup ft_ema",
                       "it applies only when fine-tuning (finetune=True, --finetune)")
                if self.aug_views == 0:
                    unused("augment", "augmentation applies only when fine-tuning (finetune=True, --finetune), to backbone "
                                      "'scratch', or to cached views for the head (aug_views > 0)")
            elif self.cache_bottom:
                unused("ft_patience", "cache_bottom runs one fixed one-cycle schedule; held-out photos decide whether it is kept")
            if self.finetune and not self.cache_bottom:
                unused("ft_views ft_mixup ft_ema", "it applies to fine-tuning on cached activations (cache_bottom=True)")
            if self.finetune and self.unfreeze_layers:
                unused("unfreeze", f"unfreeze_layers={self.unfreeze_layers} chooses what is unfrozen instead")
        unused("top_k", "training ranks no predictions; give top_k when predicting (Classifier.predict, headstart predict -k)")
        changed = [f.name for f in fields(self) if getattr(self, f.name) != f.default]
        return [f"{name}={getattr(self, name)!r} is ignored: {why[name]}" for name in changed if name in why]

    @property
    def size_search(self) -> bool:
        """Whether the input size is chosen by cross-validation: asked for (``input_size="auto"``), or left at the
        default when fine-tuning a pretrained backbone. Fine-tuning gains from a larger input than pretraining's
        (Kolesnikov et al. 2020, "BiT"; Touvron et al. 2019, "FixRes"), and only the training photos can say how much
        larger: for the 224 px Lite0, ants/bees chose 288 px in every seed, clothing 288 or 256 (BENCHMARKS.md, fine-tuning)."""
        return self.input_size == "auto" or (self.input_size is None and self.finetune and not _is_scratch(self.backbone))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


_HINTS = get_type_hints(TrainConfig)
# The Literal-typed fields and their allowed values: the one list the CLI's choices are made from.
CHOICES: dict[str, tuple[str, ...]] = {name: get_args(t) for name, t in _HINTS.items() if get_origin(t) is Literal}


def choices(name: str) -> tuple[str, ...]:
    """The allowed values of the ``Literal``-typed field ``name`` (what the CLI offers)."""
    return CHOICES[name]


def _is_scratch(backbone: str) -> bool:
    """The from-scratch baseline, matched as backbones.lookup matches names (any case and punctuation)."""
    return re.sub(r"[^a-z0-9]", "", backbone.lower()) == "scratch"


Refuse = Callable[[str, str], "ConfigError"]  # (problem, what is allowed) → the error to raise


def _checked(name: str, value: Any) -> Any:
    """``value`` as field ``name`` stores it, or a ConfigError that names the field, the value and what is allowed."""

    def refuse(problem: str, allowed: str) -> ConfigError:
        return ConfigError(name, f"{name}={value!r} {problem}: {allowed}")

    check = _CHECKS.get(name) or (_choice if name in CHOICES else _flag if _HINTS[name] is bool else _in_range)
    return check(name, value, refuse)


def _choice(name: str, value: Any, refuse: Refuse) -> Any:
    if isinstance(value, str) and value in CHOICES[name]:
        return value
    raise refuse("is not a choice", "give one of " + ", ".join(CHOICES[name]))


def _flag(name: str, value: Any, refuse: Refuse) -> Any:
    if isinstance(value, bool):
        return value
    raise refuse("is not a yes/no value", "give True or False")


def _backbone(name: str, value: Any, refuse: Refuse) -> Any:
    if isinstance(value, str) and value.strip():
        return value
    raise refuse("is not a backbone name", "give a registry name (see `headstart backbones`) or any timm model name")


def _path(name: str, value: Any, refuse: Refuse) -> Any:
    if value is None or isinstance(value, (str, os.PathLike)):
        return None if value is None else os.fspath(value)
    hint = {"weights": "give a weight file, 'random' or None", "exclude": "give a text file of paths (exclude.txt) or None"}
    raise refuse("is not a path", hint.get(name, "give a folder or None"))


def _augment(name: str, value: Any, refuse: Refuse) -> Any:
    unknown = [p for p in value.split("+") if p not in POLICIES] if isinstance(value, str) else [value]
    if not unknown:
        return value
    raise refuse(f"has an unknown policy {unknown[0]!r}", f"give one of {', '.join(POLICIES)}, or several joined with + (e.g. randaugment+erasing)")


def _crop(name: str, value: Any, refuse: Refuse) -> Any:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise refuse("is not a share of the frame", CROP_PCT_HINT)
    if not (math.isfinite(value) and value in CROP_PCT):
        raise refuse("is out of range", CROP_PCT_HINT)
    return float(value)


def _or_auto(auto_means: str, none_too: bool = False) -> Callable[[str, Any, Refuse], Any]:
    """The check of a field that takes a number within its ``RANGES`` or the word auto (and None, with ``none_too``)."""
    def check(name: str, value: Any, refuse: Refuse) -> Any:
        if value == "auto" or (none_too and value is None):
            return value
        try:
            return _in_range(name, value, refuse)
        except ConfigError as e:
            raise ConfigError(name, f"{e}, or auto ({auto_means})") from None

    return check


def _in_range(name: str, value: Any, refuse: Refuse) -> Any:
    rule = RANGES[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral if rule.whole else numbers.Real):
        raise refuse(f"is not {'a whole number' if rule.whole else 'a number'}", f"give {rule.describe()}")
    if not (math.isfinite(value) and value in rule):
        raise refuse("is out of range", f"give {rule.describe()}")
    return int(value) if rule.whole else float(value)


_CHECKS: dict[str, Callable[[str, Any, Refuse], Any]] = {
    "backbone": _backbone, "weights": _path, "cache_dir": _path, "exclude": _path, "augment": _augment, "crop_pct": _crop,
    "ft_lr": _or_auto("lr-find's suggestion"), "input_size": _or_auto("chosen by cross-validation on the training photos", none_too=True),
    "cv_folds": _or_auto(f"{CV_FOLDS}, or {CV_FOLDS_LARGE} from {CV_LARGE_ROWS} training photos"),
}


def cv_folds_for(cv_folds: int | str, rows: int) -> int:
    """How many folds a cross-validation over ``rows`` training rows runs (before any class too small caps it)."""
    if cv_folds != "auto":
        return int(cv_folds)
    return CV_FOLDS_LARGE if rows >= CV_LARGE_ROWS else CV_FOLDS


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """Real assets (data sets, weights): ``$HEADSTART_SHARED``, else ``../shared`` beside the repository."""
    env = os.environ.get("HEADSTART_SHARED")
    return Path(env).expanduser() if env else repo_root().parent / "shared"


def weights_dirs() -> list[Path]:
    """Folders searched for a backbone's weight file by its timm name (``mobilenetv2_100.safetensors``):
    ``$HEADSTART_WEIGHTS`` (several joined by ``os.pathsep``: ':' on Linux), else ``weights/`` in the cache folder."""
    env = os.environ.get("HEADSTART_WEIGHTS")
    if env:
        return [Path(d).expanduser() for d in env.split(os.pathsep) if d]
    return [cache_dir() / "weights"]


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Feature cache: ``--cache-dir``, else ``$HEADSTART_CACHE``, else ``~/.cache/headstart``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("HEADSTART_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headstart"
