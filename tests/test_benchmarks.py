"""The benchmark helpers whose correctness the published numbers rest on (timings themselves are not tested).

The Keras side's weight transplant is checked by the benchmark itself, before it times anything
(``keras_recipe.py --check-cat``): it needs TensorFlow, which only the bench extra installs."""

from __future__ import annotations

import sys
from pathlib import Path

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


def test_the_large_folder_repeats_each_photo_with_new_bytes_and_the_same_content(tmp_path: Path) -> None:
    """The 20 000-photo benchmark is only honest if no repeat can be read back from the content-keyed cache, and only
    meaningful if a repeat still shows the same thing."""
    import hashlib

    import numpy as np
    from PIL import Image

    from large import perturbed, sources

    src = sources()
    assert len(src) == 1439
    label, photo = src[7]
    copies = []
    for i in (7, 7 + len(src), 7 + 2 * len(src)):
        dest = tmp_path / f"{i}.jpg"
        perturbed((i, label, str(photo), str(dest)))
        copies.append(dest)
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in [photo, *copies]}) == 4
    with Image.open(photo) as im:
        ref = np.asarray(im.convert("RGB").resize((64, 64)), np.float32)
    for p in copies:
        with Image.open(p) as im:
            diff = np.abs(np.asarray(im.convert("RGB").resize((64, 64)), np.float32) - ref).mean()
        assert diff < 20, (p, diff)  # a few grey levels on average: the same photo, slightly moved and lit
