"""Training-time augmentation policies, built on the model's own timm data config.

``classic`` is the textbook Keras recipe (rotation ±20°, horizontal/vertical shift 0.2, horizontal flip); the
stronger policies come straight from timm (RandAugment, random resized crop, random erasing) and can be combined
with ``+``, e.g. ``randaugment+erasing``.
"""

from __future__ import annotations

import random
from typing import Any, Callable

import numpy as np
import timm
import torch
from torchvision import transforms as T

from .config import POLICIES
from .data import HeadstartError


def seed(n: int) -> None:
    """Seed every RNG the augmentations draw from (torchvision: torch's; timm: Python's and NumPy's)."""
    torch.manual_seed(n)
    random.seed(n)
    np.random.seed(n % 2**32)


def _interpolation(name: str) -> T.InterpolationMode:
    return {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}.get(name, T.InterpolationMode.BILINEAR)


def train_transform(data_config: dict[str, Any], policy: str = "classic") -> Callable:
    """PIL image → normalised tensor of the model's input size, randomly augmented by ``policy``."""
    parts = set(policy.split("+")) if policy else {"none"}
    unknown = parts - set(POLICIES)
    if unknown:
        raise HeadstartError(f"unknown augmentation '{'+'.join(sorted(unknown))}': use {', '.join(POLICIES)} (combine with +)")
    size = data_config["input_size"][-1]
    mean, std = tuple(data_config["mean"]), tuple(data_config["std"])
    interp = data_config.get("interpolation", "bilinear")
    if parts & {"rrc", "randaugment", "erasing"}:
        # timm's own training pipeline: random resized crop + flip (+ RandAugment, + random erasing).
        return timm.data.create_transform(
            input_size=size,
            is_training=True,
            interpolation=interp,
            mean=mean,
            std=std,
            scale=(0.35, 1.0) if "rrc" in parts else (0.8, 1.0),
            auto_augment="rand-m9-mstd0.5-inc1" if "randaugment" in parts else None,
            re_prob=0.25 if "erasing" in parts else 0.0,
            color_jitter=None,
        )
    resize = int(round(size / data_config.get("crop_pct", 1.0)))
    steps: list[Callable] = [T.Resize(resize, interpolation=_interpolation(interp)), T.CenterCrop(size)]
    if "classic" in parts:
        steps += [T.RandomAffine(degrees=20, translate=(0.2, 0.2), interpolation=T.InterpolationMode.BILINEAR), T.RandomHorizontalFlip()]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
