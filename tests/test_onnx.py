"""int8 extraction: a run quantized on its own photos predicts what fp32 predicts, unreadable calibration photos are
skipped, the quantized graph is made once and read back, and settings that cannot work are refused at entry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import headstart
from conftest import HYMENOPTERA
from headstart import backbones, cache, features, onnx
from headstart.config import ConfigError, TrainConfig
from headstart.data import scan


@pytest.fixture(scope="module")
def lite0():
    return backbones.load("efficientnet_lite0")


@pytest.fixture
def few_photos(tmp_path):
    """Eight real training photos, a zero-byte .jpg and a text file named .jpg."""
    train = scan(HYMENOPTERA).splits["train"]
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [shutil.copy(p, folder / f"{i}_{p.name}") for i, p in enumerate(train.paths[::30][:8])]
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not a photo")
    return [folder / "empty.jpg", folder / "text.jpg", *map(Path, paths)]


def test_unreadable_calibration_photos_are_skipped_and_the_graph_is_quantized_once(few_photos, lite0, monkeypatch, caplog):
    """11 s at load 2.4 (26 s at load 4): the fp32 export when no earlier test made it, one quantization, three extractions."""
    calib = features.calibration_sample(few_photos, n=10)
    assert len(calib.paths) == 10  # the unreadable ones are in the sample: decoding skips them
    made = []
    real = onnx.quantize
    monkeypatch.setattr(onnx, "quantize", lambda graph, batches: made.append(1) or real(graph, batches))
    first = features.extract(few_photos, lite0, use_cache=False, precision="int8", calibration=calib, progress=False)
    assert (first.runtime, first.precision, len(made)) == ("onnxruntime", "int8", 1)
    assert first.ok.tolist() == [False, False] + [True] * 8 and first.calibration == calib.digests
    assert cache.store("onnx").path(onnx.int8_key(lite0, calib), ".int8.onnx").is_file()  # the session's cache folder
    again = features.extract(few_photos, lite0, use_cache=False, precision="int8", calibration=calib, progress=False)
    assert len(made) == 1  # read back from <cache>/onnx, not quantized again
    np.testing.assert_array_equal(first.x, again.x)
    cache.store("onnx").path(onnx.int8_key(lite0, calib), ".int8.onnx").write_bytes(b"half a graph")
    with caplog.at_level("WARNING"):
        repaired = features.extract(few_photos, lite0, use_cache=False, precision="int8", calibration=calib, progress=False)
    assert len(made) == 2 and "quantizing it again" in caplog.text and repaired.precision == "int8"  # a damaged graph is made again
    np.testing.assert_array_equal(first.x, repaired.x)
    fp32 = features.extract(few_photos, lite0, use_cache=False, precision="fp32", progress=False)
    # eight photos calibrate coarsely: close to fp32, not equal (the agreement of whole runs is tested below)
    cos = (fp32.x * first.x).sum(1) / np.linalg.norm(fp32.x, axis=1) / np.linalg.norm(first.x, axis=1)
    assert fp32.precision == "fp32" and cos.min() > 0.7 and not np.array_equal(fp32.x, first.x)


def test_the_grad_cam_graph_is_derived_once_and_a_damaged_copy_derived_again(lite0, tmp_path):
    """The feature graph with the pooled map as a second output (Grad-CAM without torch) is kept beside the export;
    a file ONNX Runtime cannot read is made again from the export, never an error."""
    assert onnx.feature_session(lite0, tmp_path) is not None
    pixels = np.zeros((1, *lite0.data_config["input_size"][1:], 3), np.uint8)
    first = onnx.map_session(lite0, tmp_path).run(None, {"pixels": pixels})
    derived = cache.store("onnx", tmp_path).path(cache.key(onnx._graph_key(lite0, "embedding"), "with-map"), ".onnx")
    assert derived.is_file() and len(first) == 2 and first[1].ndim == 4  # the embedding, and the map it pools
    derived.write_bytes(b"half a graph")
    again = onnx.map_session(lite0, tmp_path).run(None, {"pixels": pixels})
    np.testing.assert_array_equal(first[1], again[1])
    assert derived.stat().st_size > 1_000_000  # repaired in place


def test_no_readable_calibration_photo_means_fp32(few_photos, lite0):
    calib = features.calibration_sample(few_photos[:2])  # the zero-byte and the text file
    f = features.extract(few_photos[2:4], lite0, use_cache=False, precision="int8", calibration=calib, progress=False)
    assert f.ok.all() and (f.precision, f.calibration) == ("fp32", ())
    assert not cache.store("onnx").path(onnx.int8_key(lite0, calib), ".int8.onnx").exists()


def test_int8_and_fp32_embeddings_are_cached_apart(lite0, few_photos):
    calib = features.calibration_sample(few_photos)
    graph = onnx.int8_key(lite0, calib)
    keys = {features.cache_key(lite0, "fp32", runtime="onnxruntime"), features.cache_key(lite0, "int8", runtime="onnxruntime", graph=graph),
            features.cache_key(lite0, "int8", runtime="onnxruntime", graph=onnx.int8_key(lite0, onnx.Calibration(calib.digests[1:])))}
    assert len(keys) == 3  # another calibration set is another graph: other embeddings


def test_int8_cannot_run_in_pytorch():
    with pytest.raises(ConfigError, match="runtime auto or onnxruntime") as e:
        TrainConfig(precision="int8", runtime="pytorch")
    assert e.value.field == "precision"
    assert TrainConfig(precision="int8").precision == "int8"


@pytest.mark.slow  # two runs on ants/bees: 43 s at load 2.4, 85-108 s at load 4-5 (2 shared cores)
def test_an_int8_run_predicts_what_fp32_predicts(tmp_path, monkeypatch):
    monkeypatch.setattr(features, "CALIBRATION_PHOTOS", 32)
    fp32 = headstart.train(HYMENOPTERA, out=tmp_path / "fp32", precision="fp32", head="linear", progress=False)
    int8 = headstart.train(HYMENOPTERA, out=tmp_path / "int8", precision="int8", head="linear", cache_dir=str(tmp_path / "cache"),
                           progress=False)  # a cache of its own: predict must find the graph there
    made = int8.info["features"]
    assert made["precision"] == "int8" and len(made["calibration"]) == 32
    assert fp32.info["features"]["precision"] == "fp32"
    monkeypatch.setattr(onnx, "quantize", lambda *a: pytest.fail("predict must read the run's int8 graph back"))
    val = scan(HYMENOPTERA).splits["val"].paths
    shutil.rmtree(tmp_path / "cache" / "onnx")  # as on another machine: the run folder carries its int8 graph
    loaded = headstart.load(tmp_path / "int8")
    p8, f8 = loaded.proba(val)
    p32, f32 = fp32.proba(val)
    assert f8.precision == "int8" and f8.calibration == tuple(made["calibration"]) and f32.precision == "fp32"
    agree = (p8.argmax(1) == p32.argmax(1)).mean()
    assert agree >= 0.97, f"int8 and fp32 heads agree on {100 * agree:.1f}% of the validation photos"


def test_calibration_sample_takes_each_class_in_turn_and_barely_moves_when_photos_are_added(tmp_path):
    paths = []
    for i in range(30):
        paths.append(tmp_path / f"{'ab'[i % 2]}{i}.jpg")
        paths[-1].write_bytes(bytes([i]))
    labels = [i % 2 for i in range(30)]
    calib = features.calibration_sample(paths, labels, n=6)
    assert sorted(p.name[0] for p in calib.paths) == list("aaabbb") and len(set(calib.digests)) == 6
    assert features.calibration_sample(paths, labels, n=6) == calib  # seeded: the same sample every time
    more = tmp_path / "a99.jpg"
    more.write_bytes(b"new")
    moved = set(features.calibration_sample([*paths, more], [*labels, 0], n=6).paths) - set(calib.paths)
    assert moved <= {more}  # a new photo can only take a place; the others stay
