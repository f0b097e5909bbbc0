"""The benchmark helpers whose correctness the published numbers rest on (timings themselves are not tested)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import WEIGHTS

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


def test_photo_folder_balances_classes_and_repeats_past_the_distinct_photos(tmp_path: Path) -> None:
    from compare_keras import photo_folder

    small = photo_folder(tmp_path, 25)
    counts = sorted(len(list(d.iterdir())) for d in small.iterdir())
    assert len(counts) == 10 and sum(counts) == 25 and counts[-1] - counts[0] <= 1

    big = photo_folder(tmp_path, 1500)
    links = list(big.rglob("*.jpg"))
    targets = {p.resolve() for p in links}
    assert len(links) == 1500 and all(p.is_symlink() and p.resolve().is_file() for p in links)
    assert len(targets) == 1439  # every distinct clothing photo once, then repeats under new names


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs the bench extra (tensorflow-cpu)")
def test_keras_transplant_recognises_the_cat() -> None:
    """The Keras side's accuracy is only real if the copied weights are: the ImageNet cat must come out a cat."""
    code = f"""
import sys; sys.path.insert(0, {str(BENCH)!r})
import numpy as np, tensorflow as tf
from PIL import Image
from safetensors.numpy import load_file
from skimage import data
from keras_recipe import transplant
m = tf.keras.applications.MobileNetV2(include_top=True, weights=None, input_shape=(224, 224, 3))
assert transplant(m, {str(WEIGHTS / 'mobilenetv2_100.safetensors')!r}) == 104
sd = load_file({str(WEIGHTS / 'mobilenetv2_100.safetensors')!r})
m.layers[-1].set_weights([sd["classifier.weight"].T, sd["classifier.bias"]])
x = np.asarray(Image.fromarray(data.chelsea()).resize((224, 224)), np.float32) / 127.5 - 1
print(int(m.predict(x[None], verbose=0)[0].argmax()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.split()[-1]) in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


def test_rewriting_one_benchmark_section_keeps_every_other(tmp_path: Path, monkeypatch) -> None:
    """A section writer once swallowed the next section's opening marker, so that section was appended twice."""
    import common

    doc = tmp_path / "BENCHMARKS.md"
    monkeypatch.setattr(common, "BENCHMARKS", doc)
    for name in ("onnx", "compare", "keras"):
        common.write_section(name, f"## {name}\n\nold {name}\n")
    common.write_section("compare", "## compare\n\nnew compare\n")
    text = doc.read_text()
    assert "new compare" in text and "old compare" not in text
    assert all(text.count(f"<!-- {n} -->") == 1 and f"old {n}" in text for n in ("onnx", "keras"))
    assert text.index("onnx") < text.index("new compare") < text.index("old keras")  # order kept
