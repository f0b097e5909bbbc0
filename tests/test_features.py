"""Embedding extraction: the cache really caches, bf16 stays close to fp32, bad files are skipped by name."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import HYMENOPTERA, save_image
from headstart import backbones, features
from headstart.data import scan


@pytest.fixture(scope="module")
def lite0():
    return backbones.load("efficientnet_lite0")


def test_second_extraction_computes_nothing_and_matches(tmp_path, lite0):
    paths = scan(HYMENOPTERA).splits["val"].paths[:40]
    first = features.extract(paths, lite0, cache_dir=tmp_path, progress=False)
    assert first.computed == 40 and first.ok.all()
    again = features.extract(paths, lite0, cache_dir=tmp_path, progress=False)
    assert again.computed == 0
    np.testing.assert_array_equal(first.x, again.x)
    more = features.extract(paths + scan(HYMENOPTERA).splits["val"].paths[40:45], lite0, cache_dir=tmp_path, progress=False)
    assert more.computed == 5  # only what is new
    leftovers = [p for p in tmp_path.rglob("*") if p.name.startswith(".")]
    assert leftovers == []  # no temporary files left behind


def test_cache_key_depends_on_weights_and_precision(lite0):
    other = backbones.load("efficientnet_lite1")
    assert features.cache_key(lite0, "fp32") != features.cache_key(lite0, "bf16")
    assert features.cache_key(lite0, "fp32") != features.cache_key(other, "fp32")


def test_bad_file_is_skipped_with_its_name(tmp_path, lite0):
    good = scan(HYMENOPTERA).splits["val"].paths[:3]
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a photo")
    f = features.extract([good[0], bad, *good[1:]], lite0, use_cache=False, progress=False)
    assert f.ok.tolist() == [True, False, True, True] and f.x.shape == (3, lite0.num_features)
    assert f.skipped[0].path.endswith("broken.jpg") and "not an image" in f.skipped[0].reason


def test_bf16_embeddings_stay_close_to_fp32(lite0):
    if not features.bf16_supported():
        pytest.skip("this CPU has no native bf16; headstart uses fp32 here")
    paths = scan(HYMENOPTERA).splits["val"].paths[:32]
    a = features.extract(paths, lite0, use_cache=False, precision="fp32", progress=False).x
    b = features.extract(paths, lite0, use_cache=False, precision="bf16", progress=False).x
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.98


def test_tiny_and_odd_images_still_embed(tmp_path, lite0):
    paths = [save_image(tmp_path / "one.png", size=(1, 1)), save_image(tmp_path / "wide.png", size=(500, 7)),
             save_image(tmp_path / "gray.png", mode="L")]
    f = features.extract(paths, lite0, use_cache=False, progress=False)
    assert f.ok.all() and np.isfinite(f.x).all()
