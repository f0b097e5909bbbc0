"""Every preprocessing and augmentation transform, built on the model's own timm data config.

Inference uses timm's eval transform (resize the shorter side to ``floor(size / crop_pct)``, centre crop,
normalise): ``resize_size`` is that one rule, and everything else (JPEG draft decoding, the deployed graph's
description, the classic augmentation) derives from it. Training augmentation: ``classic`` is the textbook Keras
recipe (rotation ±20°, horizontal/vertical shift 0.2, horizontal flip); the stronger policies come straight from
timm (RandAugment, random resized crop, random erasing) and combine with ``+``, e.g. ``randaugment+erasing``.

torch, torchvision and timm are imported where a transform is built: a re-run answered by the cache needs none.
"""

from __future__ import annotations

import math
import random
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .config import POLICIES, HeadstartError

if TYPE_CHECKING:
    import torch


# ------------------------------------------------------------------------------------------- the size rule


def resize_size(data_config: dict[str, Any]) -> int:
    """The shorter side timm's eval transform resizes to before its centre crop: ``floor(size / crop_pct)``."""
    return math.floor(data_config["input_size"][-1] / data_config.get("crop_pct", 1.0))


def decode_size(data_config: dict[str, Any]) -> int:
    """The smallest shorter side a photo may be decoded at (JPEG draft mode) so the resize never upsamples:
    ``resize_size`` rounded up rather than down, one pixel of margin where ``size / crop_pct`` is fractional."""
    return math.ceil(data_config["input_size"][-1] / data_config.get("crop_pct", 1.0))


def preprocess_info(data_config: dict[str, Any]) -> dict[str, Any]:
    """timm's eval preprocessing spelled out, so a consumer of an exported model can reproduce it without timm."""
    return {
        "input_size": [int(v) for v in data_config["input_size"]],  # C, H, W
        "resize_shorter_side": resize_size(data_config),  # keep the aspect ratio
        "crop_pct": float(data_config.get("crop_pct", 0.875)),
        "crop_mode": data_config.get("crop_mode", "center"),
        "interpolation": data_config.get("interpolation", "bicubic"),
        "mean": [float(v) for v in data_config["mean"]],
        "std": [float(v) for v in data_config["std"]],
        "scale": "pixels / 255, then (x - mean) / std, RGB, NCHW float32",
        "timm_data_config": data_config,
    }


# ---------------------------------------------------------------------------------------------- inference


def eval_transform(data_config: dict[str, Any]) -> Callable:
    """timm's own inference preprocessing for this model (resize, centre crop, normalise): PIL → float tensor."""
    import timm.data

    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()}
    return timm.data.create_transform(**cfg, is_training=False)


def pixel_transform(data_config: dict[str, Any]) -> Callable:
    """timm's eval preprocessing up to, not including, ToTensor/Normalize: PIL image → uint8 HWC array.

    Batches travel as uint8 (a quarter of float32's bytes) and are normalised in one vectorised step
    (``normalize``, or inside the ONNX graph). The usual recipe (square input, centre crop) is done with Pillow
    alone, the very calls torchvision makes on a PIL image, so extracting with ONNX Runtime imports neither torch
    nor timm (seconds of a new-photos run); any other recipe goes through timm's own transform.
    """
    return _pillow_pixels(data_config) or timm_pixels(data_config)


_PIL_FILTERS = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}  # PIL.Image.Resampling


def _pillow_pixels(data_config: dict[str, Any]) -> Callable | None:
    """timm's centre-crop eval transform as torchvision runs it on a PIL image: the shorter side resized to
    ``resize_size`` (the longer one ``int(size * long / short)``, no resize when already that size), then a centre
    crop whose offsets are ``round((side - crop) / 2)``. None for a recipe this does not spell out."""
    h, w = (int(v) for v in data_config["input_size"][-2:])
    resample = _PIL_FILTERS.get(data_config.get("interpolation", "bilinear"))
    if h != w or data_config.get("crop_mode", "center") != "center" or resample is None or data_config.get("crop_pct", 1) > 1:
        return None
    short_side = resize_size(data_config)

    def to_pixels(img: Any) -> np.ndarray:
        iw, ih = img.size
        short, long = min(iw, ih), max(iw, ih)
        new = (short_side, int(short_side * long / short))
        size = new if iw <= ih else new[::-1]
        if size != (iw, ih):
            img = img.resize(size, resample)
        left, top = int(round((size[0] - w) / 2.0)), int(round((size[1] - h) / 2.0))
        return np.asarray(img.crop((left, top, left + w, top + h)), dtype=np.uint8)

    return to_pixels


def timm_pixels(data_config: dict[str, Any]) -> Callable:
    """``pixel_transform`` through timm's own transform (torchvision): any recipe, and the reference the Pillow path
    is tested against."""
    steps = [t for t in eval_transform(data_config).transforms if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
    size = tuple(int(v) for v in data_config["input_size"][-2:])

    def to_pixels(img: Any) -> np.ndarray:
        for t in steps:
            img = t(img)
        a = np.asarray(img, dtype=np.uint8)
        if a.shape != (*size, 3):  # a timm transform this code does not know about: fail loudly, not silently
            raise RuntimeError(f"preprocessing gave {a.shape}, expected {(*size, 3)}")
        return a

    return to_pixels


def whole_frame_transform(data_config: dict[str, Any]) -> Callable:
    """The shorter side resized to the input size and nothing cropped (at most 3× as long as it is wide): the whole
    photo, for explaining what a convolutional network sees beyond the centre crop."""
    from timm.data import str_to_interp_mode
    from torchvision import transforms as T

    size = data_config["input_size"][-1]
    return T.Compose([T.Resize(size, interpolation=str_to_interp_mode(data_config["interpolation"]), max_size=3 * size),
                      T.ToTensor(), T.Normalize(data_config["mean"], data_config["std"])])


def normalize(pixels: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """uint8 NHWC → float NCHW: what timm's ToTensor + Normalize make of each image (to float rounding)."""
    import torch

    mean = torch.tensor(data_config["mean"], device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std


# -------------------------------------------------------------------------------------------- augmentation


def seed(n: int) -> None:
    """Seed every RNG the augmentations draw from (torchvision: torch's; timm: Python's and NumPy's)."""
    import torch

    torch.manual_seed(n)
    random.seed(n)
    np.random.seed(n % 2**32)


def check_policy(policy: str) -> set[str]:
    """The parts of a ``+``-combined augmentation policy; an unknown part is refused by name."""
    parts = set(policy.split("+")) if policy else {"none"}
    unknown = parts - set(POLICIES)
    if unknown:
        raise HeadstartError(f"unknown augmentation '{'+'.join(sorted(unknown))}': use {', '.join(POLICIES)} (combine with +)")
    return parts


def train_transform(data_config: dict[str, Any], policy: str = "classic") -> Callable:
    """PIL image → normalised tensor of the model's input size, randomly augmented by ``policy``."""
    import timm.data
    from timm.data import str_to_interp_mode
    from torchvision import transforms as T

    parts = check_policy(policy)
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
    mode = str_to_interp_mode(interp if interp in ("bicubic", "bilinear") else "bilinear")
    steps: list[Callable] = [T.Resize(resize_size(data_config), interpolation=mode), T.CenterCrop(size)]
    if "classic" in parts:
        steps += [T.RandomAffine(degrees=20, translate=(0.2, 0.2), interpolation=T.InterpolationMode.BILINEAR), T.RandomHorizontalFlip()]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
