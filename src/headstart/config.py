"""One place for the defaults: hyper-parameters, the error type, the version, where caches live, where shared
assets are found. The bottom layer: it imports nothing from headstart."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

DEFAULT_BACKBONE = "efficientnet_lite0"

# Augmentation policies (augment.py builds them), combined with "+": named here so a config is checked without torch.
POLICIES = ("none", "classic", "rrc", "randaugment", "erasing")


class HeadstartError(Exception):
    """An error a person can act on: printed without a traceback by the CLI."""


@dataclass
class TrainConfig:
    """Every knob of a training run, with the defaults that work first time.

    Saved verbatim into the run folder so a run can be reproduced from its config alone.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str | None = None  # explicit weight file; None = package, then hub
    input_size: int | None = None  # pixels (square) the backbone sees; None = its timm data config (see README)
    crop_pct: float | str | None = None  # centre crop (timm's): 1.0 = whole shorter side; None = timm's; "auto" = by CV
    head: str = "auto"  # "auto" (chosen by cross-validation on train), "mlp" or "linear"
    hidden: int = 256  # the classic Dense(256, ReLU)
    dropout: float = 0.5
    lr: float = 1e-3  # Adam, as in the classic recipe
    weight_decay: float = 1e-4
    max_epochs: int = 200  # head epochs are milliseconds on cached features; early stopping ends them
    patience: int = 15
    batch_size: int = 32  # images per backbone forward pass
    head_batch_size: int = 64
    val_fraction: float = 0.2  # only when the folder has no validation split
    cv_folds: int = 5
    class_weights: str = "auto"  # "auto" = balanced when classes are imbalanced, "none", "balanced"
    precision: str = "auto"  # PyTorch's: "auto" (bf16 where the CPU supports it), "bf16", "fp32"
    runtime: str = "auto"  # what runs the frozen backbone: "auto" (ONNX Runtime fp32 on a CPU), "onnxruntime", "pytorch"
    channels_last: bool = True  # the memory layout oneDNN's CPU convolutions are fastest with
    workers: int = -1  # decode workers (threads for extraction, processes for fine-tuning); -1 = one per spare core
    seed: int = 0
    cache_dir: str | None = None
    top_k: int = 5
    # fine-tuning (second stage) and the from-scratch baseline
    finetune: bool = False
    unfreeze: int = 3  # top blocks of the backbone to unfreeze (timm's own block grouping)
    unfreeze_layers: int = 0  # the Keras alternative: the last N layers with weights (overrides unfreeze)
    ft_lr: float = 1e-3  # head learning rate while fine-tuning (the head stage's Adam rate)
    backbone_lr_ratio: float = 0.1  # the backbone learns 10x more gently than the head
    ft_epochs: int = 8
    ft_patience: int = 3
    ft_batch_size: int = 32
    ft_weight_decay: float = 1e-4
    label_smoothing: float = 0.1  # keeps a useful gradient once the head fits the training set
    train_bn: bool = False  # False keeps BatchNorm running statistics as pretrained
    augment: str = "classic"  # rotation ±20°, shifts 0.2, horizontal flip; or rrc, randaugment, erasing (+ to combine)
    aug_views: int = 0  # augmented views per training image cached for the head stage
    scratch_epochs: int = 40
    scratch_patience: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def shared_dir() -> Path:
    """Real assets (data sets, weights): ``$HEADSTART_SHARED``, else ``../shared`` beside the repository."""
    env = os.environ.get("HEADSTART_SHARED")
    return Path(env).expanduser() if env else repo_root().parent / "shared"


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Feature cache: ``--cache-dir``, else ``$HEADSTART_CACHE``, else ``~/.cache/headstart``."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get("HEADSTART_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "headstart"
