"""Predict with a model exported by `headstart export`, using only onnxruntime, numpy and Pillow.

    pip install onnxruntime numpy pillow
    python predict_onnx.py EXPORTED_FOLDER photo.jpg [more.jpg ...] [--json]

EXPORTED_FOLDER holds model.onnx and onnx_meta.json. The preprocessing below mirrors timm's eval transform,
which headstart uses: resize the shorter side to int(size / crop_pct) keeping the aspect ratio, centre-crop
size x size, scale to [0, 1], normalise with mean/std, channels first.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


def load_image(path: str, pre: dict) -> np.ndarray:
    """One photo as a (3, size, size) float32 array."""
    size, short = pre["input_size"][-1], pre["resize_shorter_side"]
    img = Image.open(path)
    scale = min(img.size) / math.ceil(size / pre["crop_pct"])
    if img.format == "JPEG" and scale >= 2:  # decode big JPEGs at reduced scale (faster), exactly as headstart does
        img.draft("RGB", (int(img.width / scale) + 1, int(img.height / scale) + 1))
    img = ImageOps.exif_transpose(img).convert("RGB")
    w, h = img.size
    if w <= h:
        new = (short, int(short * h / w))
    else:
        new = (int(short * w / h), short)
    img = img.resize(new, RESAMPLE[pre["interpolation"]])
    left, top = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = np.asarray(img, dtype=np.float32) / 255.0
    x = (x - np.array(pre["mean"], np.float32)) / np.array(pre["std"], np.float32)
    return x.transpose(2, 0, 1)


def main(argv: list[str]) -> None:
    as_json = "--json" in argv
    args = [a for a in argv if a != "--json"]
    if len(args) < 2:
        sys.exit(__doc__)
    folder, photos = Path(args[0]), args[1:]
    meta = json.loads((folder / "onnx_meta.json").read_text())
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = np.stack([load_image(p, meta["preprocess"]) for p in photos])
    proba = session.run(None, {meta["input"]: batch})[0]
    rows = []
    for path, p in zip(photos, proba):
        best = int(p.argmax())
        rows.append({"path": path, "label": meta["classes"][best], "probability": float(p[best]), "probabilities": p.tolist()})
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['probability']:7.2%}  {r['label']:<20} {r['path']}")


if __name__ == "__main__":
    main(sys.argv[1:])
