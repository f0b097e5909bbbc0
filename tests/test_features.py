"""Embedding extraction: the cache really caches, bf16 stays close to fp32, bad files are skipped by name."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import HYMENOPTERA, save_image
from headstart import backbones, features, onnx
from headstart.data import scan


@pytest.fixture(scope="module")
def lite0():
    return backbones.load("efficientnet_lite0")


@pytest.mark.slow
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


def test_one_pipeline_per_core_matches_one_pass_and_still_skips_a_bad_photo(tmp_path, lite0, monkeypatch):
    """With more than one batch to run, each core decodes and runs its own batches through a one-thread ONNX Runtime
    session: the same vectors in the same order as one pass, and a broken photo in the middle skipped by name."""
    val = scan(HYMENOPTERA).splits["val"].paths[:11]
    bad = tmp_path / "broken.jpg"
    bad.write_text("not a photo")
    paths = [*val[:5], bad, *val[5:]]
    threads: list[int] = []
    session = onnx.feature_session
    monkeypatch.setattr(onnx, "feature_session", lambda lb, cache_dir=None, output="embedding", n=0: threads.append(n) or session(lb, cache_dir, output, n))
    one = features.extract(paths, lite0, use_cache=False, workers=0, progress=False)
    lanes = features.extract(paths, lite0, use_cache=False, workers=1, batch_size=4, progress=False)
    assert threads == [0, 1]  # ONNX Runtime's own threads for one pass; one thread per pipeline
    np.testing.assert_array_equal(one.x, lanes.x)
    assert lanes.ok.tolist() == [True] * 5 + [False] + [True] * 6
    assert [s.path for s in lanes.skipped] == [s.path for s in one.skipped] and lanes.skipped[0].path.endswith("broken.jpg")


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


@pytest.mark.slow
def test_onnxruntime_embeddings_equal_pytorch_fp32(tmp_path, lite0):
    """The default CPU runtime must compute the embeddings PyTorch computes, not something close to them."""
    paths = scan(HYMENOPTERA).splits["val"].paths[:24]
    ort = features.extract(paths, lite0, cache_dir=tmp_path, use_cache=False, runtime="auto", progress=False)
    ref = features.extract(paths, lite0, use_cache=False, runtime="pytorch", precision="fp32", progress=False)
    assert ort.runtime == "onnxruntime" and ref.runtime == "pytorch"
    np.testing.assert_allclose(ort.x, ref.x, atol=1e-4 * np.abs(ref.x).max())
    assert list((tmp_path / "onnx").glob("*.onnx")), "the exported backbone is kept in the cache folder"


@pytest.mark.slow
def test_exported_backbone_is_reused_and_a_failed_export_falls_back_to_pytorch(tmp_path, lite0, monkeypatch, caplog):
    from headstart import onnx

    paths = scan(HYMENOPTERA).splits["val"].paths[:4]
    features.extract(paths, lite0, cache_dir=tmp_path, use_cache=False, progress=False)

    def broken(_lb, _output):
        raise onnx.ExportError("exporter exploded")

    monkeypatch.setattr(onnx, "feature_graph", broken)
    monkeypatch.setattr(onnx, "_REFUSED", {})  # this test's refusal must not outlive it
    again = features.extract(paths, lite0, cache_dir=tmp_path, use_cache=False, progress=False)
    assert again.runtime == "onnxruntime"  # read back from the cache folder: no second export
    other = features.extract(paths, lite0, cache_dir=tmp_path / "elsewhere", progress=False)
    assert other.runtime == "pytorch" and other.ok.all()
    assert "exporter exploded" in caplog.text and "using PyTorch" in caplog.text
    features.extract(paths, lite0, cache_dir=tmp_path / "elsewhere", progress=False)
    assert caplog.text.count("exporter exploded") == 1  # refused once, said once
    assert features.cache_key(lite0, "fp32", runtime="onnxruntime") != features.cache_key(lite0, "fp32")


def test_a_refused_export_is_remembered_by_later_runs(tmp_path, lite0, monkeypatch, caplog):
    """A backbone that does not export faithfully is not tried again by every later run (each try builds the
    network and checks the graph); other library versions try again."""
    from headstart import onnx

    paths = scan(HYMENOPTERA).splits["val"].paths[:2]
    monkeypatch.setattr(onnx, "_REFUSED", {})

    def broken(_lb, _output):
        raise onnx.ExportError("exporter exploded")

    monkeypatch.setattr(onnx, "feature_graph", broken)
    assert features.extract(paths, lite0, cache_dir=tmp_path, progress=False).runtime == "pytorch"
    monkeypatch.setattr(onnx, "_REFUSED", {})  # as a new process

    def never(_lb, _output):
        raise AssertionError("the export was tried again")

    monkeypatch.setattr(onnx, "feature_graph", never)
    again = features.extract(paths, lite0, cache_dir=tmp_path, progress=False)
    assert again.runtime == "pytorch" and again.computed == 0  # straight to PyTorch's cached embeddings
    assert "found by an earlier run" in caplog.text
    monkeypatch.setattr(onnx, "_REFUSED", {})
    monkeypatch.setattr(onnx, "_libraries", lambda: ["other versions"])
    with pytest.raises(AssertionError, match="tried again"):
        features.extract(paths, lite0, cache_dir=tmp_path, use_cache=False, progress=False)


@pytest.mark.slow
def test_damaged_exported_backbone_is_exported_again(tmp_path, lite0, caplog):
    paths = scan(HYMENOPTERA).splits["val"].paths[:3]
    want = features.extract(paths, lite0, cache_dir=tmp_path, use_cache=False, progress=False).x
    (onnx_file,) = (tmp_path / "onnx").glob("*.onnx")
    onnx_file.write_bytes(b"half a graph")
    got = features.extract(paths, lite0, cache_dir=tmp_path, use_cache=False, progress=False)
    assert got.runtime == "onnxruntime" and "exporting it again" in caplog.text
    np.testing.assert_array_equal(got.x, want)
    assert onnx_file.stat().st_size > 1_000_000  # repaired in place


def test_runtime_choice():
    assert features.resolve_runtime("auto", "auto", "cpu") == "onnxruntime"
    assert features.resolve_runtime("auto", "bf16", "cpu") == "pytorch"  # bf16 asked for: only PyTorch has it
    assert features.resolve_runtime("auto", "auto", "cuda") == "pytorch"
    assert features.resolve_runtime("auto", "auto", "cpu", augmented=True) == "pytorch"
    with pytest.raises(ValueError, match="runtime"):
        features.resolve_runtime("tensorrt")
    with pytest.raises(ValueError, match="fp32 on the CPU"):
        features.resolve_runtime("onnxruntime", "bf16", "cpu")


@pytest.mark.slow
def test_unwritable_cache_folder_still_uses_onnxruntime(tmp_path, lite0, caplog):
    """A cache folder that cannot be written (here: a file stands where it should be) only costs the export next
    time: the run goes on, in ONNX Runtime, and says why."""
    blocked = tmp_path / "cache"
    blocked.write_text("not a folder")
    paths = scan(HYMENOPTERA).splits["val"].paths[:2]
    f = features.extract(paths, lite0, cache_dir=blocked, use_cache=False, progress=False)
    assert f.runtime == "onnxruntime" and f.ok.all()
    assert "cannot write the cache folder" in caplog.text and "computed again next run" in caplog.text


@pytest.mark.slow
def test_decode_threads_change_nothing_not_even_augmented_views(lite0):
    """Threads decode in parallel; an augmented view seeds global RNGs, so the result must still not depend on
    how many threads there are (or on which batch an image falls in)."""
    paths = scan(HYMENOPTERA).splits["train"].paths[:10]
    plain = [features.extract(paths, lite0, use_cache=False, workers=w, batch_size=b, progress=False).x for w, b in ((0, 8), (3, 3))]
    np.testing.assert_array_equal(plain[0], plain[1])
    views = [features.extract(paths, lite0, use_cache=False, workers=w, batch_size=b, augment_policy="classic", view=1, progress=False).x
             for w, b in ((0, 8), (3, 3))]
    np.testing.assert_allclose(views[0], views[1], rtol=0, atol=1e-5 * np.abs(views[0]).max())
    assert not np.allclose(views[0], plain[0])  # and the view really is augmented
