"""Preprocessing: the Pillow-only eval transform gives timm's pixels exactly, so ONNX Runtime extraction can skip
importing torch and timm without changing a single embedding."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import HYMENOPTERA
from headstart import transforms
from headstart.data import open_rgb

MEAN_STD = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
RECIPES = [  # the registry's recipes: Lite0, whole frame, torchvision ResNet50, InceptionV3 at 299, a tight crop
    {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875},
    {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 1.0},
    {"input_size": (3, 224, 224), "interpolation": "bilinear", "crop_pct": 0.875},
    {"input_size": (3, 299, 299), "interpolation": "bicubic", "crop_pct": 0.875},
    {"input_size": (3, 240, 240), "interpolation": "bicubic", "crop_pct": 0.5},
]


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r['input_size'][-1]}-{r['interpolation']}-{r['crop_pct']}")
def test_pillow_pixels_equal_timms_on_real_and_odd_photos(recipe):
    cfg = {**recipe, **MEAN_STD, "crop_mode": "center"}
    ours, timms = transforms.pixel_transform(cfg), transforms.timm_pixels(cfg)
    assert ours.__qualname__.startswith("_pillow_pixels")  # the fast path is the one taken
    photos = sorted((HYMENOPTERA / "val").rglob("*.jpg"))[::4]
    images = [open_rgb(p, transforms.decode_size(cfg)) for p in photos]
    rng = np.random.default_rng(0)
    side = transforms.resize_size(cfg)
    for w, h in [(300, 900), (900, 300), (side, side), (side, side + 1), (50, 40), (257, 256)]:  # tall, wide, exact, tiny
        images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
    for img in images:
        a, b = ours(img), timms(img)
        assert a.dtype == np.uint8 and a.shape == (*cfg["input_size"][1:], 3)
        assert np.array_equal(a, b), img.size


def test_another_crop_mode_goes_through_timm():
    cfg = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "squash", **MEAN_STD}
    assert transforms.pixel_transform(cfg).__qualname__.startswith("timm_pixels")


def test_the_pillow_path_imports_neither_torch_nor_timm():
    code = ("import sys; from PIL import Image; from headstart import transforms; "
            "f = transforms.pixel_transform({'input_size': (3, 224, 224), 'interpolation': 'bicubic', 'crop_pct': 0.875, "
            "'mean': (0.5,) * 3, 'std': (0.5,) * 3}); f(Image.new('RGB', (640, 480))); "
            "print(sorted(m for m in ('torch', 'timm', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
