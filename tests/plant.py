"""A copy of the clothing set with known faults planted in it (fixed seed), for the audit's tests and benchmark.

Planted, from disjoint photos: exact copies of train photos in validation/test, near copies (resized, JPEG
re-compressed, cropped, brightened), train photos moved to a wrong class, ants/bees photos put into clothing
classes, and placeholder/dark/blank images. ``plant`` returns where each fault is, as paths relative to the copy.
"""

from __future__ import annotations

import io
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance


@dataclass
class Planted:
    exact: set[tuple[str, str]] = field(default_factory=set)  # (val/test copy, train original)
    near: set[tuple[str, str]] = field(default_factory=set)
    moved: set[str] = field(default_factory=set)  # train photos now in a wrong class folder
    offtopic: set[str] = field(default_factory=set)
    junk: set[str] = field(default_factory=set)


def near_copy(img: Image.Image, rng: random.Random) -> bytes:
    """Every one of: resized to 60–90 %, a 5–10 % crop, a small brightness change, JPEG quality 30–60."""
    w, h = img.size
    c = rng.uniform(0.05, 0.10)
    left, top = rng.uniform(0, c) * w, rng.uniform(0, c) * h
    img = img.crop((round(left), round(top), round(w - (c * w - left)), round(h - (c * h - top))))
    s = rng.uniform(0.6, 0.9)
    img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BILINEAR)
    img = ImageEnhance.Brightness(img).enhance(rng.choice([-1, 1]) * rng.uniform(0.03, 0.10) + 1)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=rng.randint(30, 60))
    return buf.getvalue()


def _junk(src: Path) -> dict[str, Image.Image]:
    """Five pictures that are not photos of anything: uniform, black, blank, a very dark photo, a placeholder."""
    placeholder = Image.new("RGB", (400, 400), (235, 235, 235))
    d = ImageDraw.Draw(placeholder)
    d.rectangle((150, 150, 250, 230), outline=(150, 150, 150), width=6)
    d.text((140, 260), "image not found", fill=(120, 120, 120))
    photo = Image.open(src).convert("RGB")
    return {"uniform-gray.jpg": Image.new("RGB", (400, 533), (128, 128, 128)), "black.png": Image.new("RGB", (400, 533)),
            "blank.png": Image.new("RGB", (533, 400), (255, 255, 255)), "too-dark.jpg": photo.point(lambda v: v * 0.06),
            "placeholder.png": placeholder}


def plant(clothing: Path, hymenoptera: Path, dst: Path, seed: int = 0, n_exact: int = 20, n_near: int = 20,
          moved_share: float = 0.05, n_offtopic: int = 10) -> Planted:
    shutil.copytree(clothing, dst)
    rng = random.Random(seed)
    classes = sorted(p.name for p in (dst / "train").iterdir() if p.is_dir())
    train = sorted(p for c in classes for p in (dst / "train" / c).iterdir())
    n_moved = round(moved_share * len(train))
    picked = rng.sample(train, n_exact + n_near + n_moved + 5)
    truth = Planted()
    held = ["validation", "test"]
    for k, src in enumerate(picked[:n_exact]):
        to = dst / held[k % 2] / src.parent.name / f"exact-{k}.jpg"
        shutil.copyfile(src, to)
        truth.exact.add((_rel(to, dst), _rel(src, dst)))
    for k, src in enumerate(picked[n_exact:n_exact + n_near]):
        to = dst / held[k % 2] / src.parent.name / f"near-{k}.jpg"
        to.write_bytes(near_copy(Image.open(src).convert("RGB"), rng))
        truth.near.add((_rel(to, dst), _rel(src, dst)))
    for src in picked[n_exact + n_near:n_exact + n_near + n_moved]:
        wrong = rng.choice([c for c in classes if c != src.parent.name])
        to = dst / "train" / wrong / src.name
        src.rename(to)
        truth.moved.add(_rel(to, dst))
    insects = sorted(p for p in (hymenoptera / "train").glob("*/*.jpg"))
    for k, src in enumerate(rng.sample(insects, n_offtopic)):
        to = dst / "train" / classes[k % len(classes)] / f"offtopic-{k}.jpg"
        shutil.copyfile(src, to)
        truth.offtopic.add(_rel(to, dst))
    for k, (name, img) in enumerate(_junk(picked[-1]).items()):
        to = dst / "train" / classes[k] / name
        img.save(to)
        truth.junk.add(_rel(to, dst))
    return truth


def _rel(p: Path, root: Path) -> str:
    return str(p.relative_to(root))
