"""Look inside: Grad-CAM lands on the object, feature maps show the photo, and every backbone can be explained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import skimage.data
from click.testing import CliRunner
from PIL import Image

import headstart
from conftest import HYMENOPTERA
from headstart import backbones, explain, heads
from headstart.cli import main
from headstart.data import HeadstartError

# chelsea() is 451×300 and the cat fills most of it: face and body span x 0–385 (its right ear and cheek end
# there); to the right of that is the blurred room. (x0, y0, x1, y1) in the photo's pixels, set by viewing it.
CAT = (0, 0, 385, 300)
FACE = (110, 50, 370, 290)  # eyes to mouth


@pytest.fixture(scope="module")
def lite0() -> explain.Subject:
    return explain.imagenet()  # the default backbone with its real ImageNet weights


def _box_mask(heat: np.ndarray, box: tuple[int, int, int, int], photo: tuple[int, int] = (300, 451)) -> np.ndarray:
    """The box, given in the photo's pixels, on the heat-map's grid (whole-photo mode only rescales)."""
    sy, sx = heat.shape[0] / photo[0], heat.shape[1] / photo[1]
    x0, y0, x1, y1 = box
    mask = np.zeros(heat.shape, bool)
    mask[round(y0 * sy) : round(y1 * sy), round(x0 * sx) : round(x1 * sx)] = True
    return mask


def test_gradcam_of_the_imagenet_model_lies_on_the_cat(lite0):
    cam = explain.gradcam(lite0, skimage.data.chelsea(), whole=True)
    assert cam.predicted in ("tiger cat", "Egyptian cat", "tabby, tabby cat") and cam.target == cam.predicted
    assert cam.heat.shape == cam.image.shape[:2] == (224, 336) and cam.layer == "bn2"
    cat = _box_mask(cam.heat, CAT)
    assert cam.heat[cat].mean() >= 2 * cam.heat[~cat].mean()
    peak = np.unravel_index(cam.heat.argmax(), cam.heat.shape)
    assert _box_mask(cam.heat, FACE)[peak]
    # the evidence for a class that is not in the photo is not where the cat is
    espresso = explain.gradcam(lite0, skimage.data.chelsea(), target="espresso", whole=True)
    assert espresso.target == "espresso" and espresso.probability < 0.01
    assert espresso.heat[cat].mean() < espresso.heat[~cat].mean()


@pytest.mark.slow
def test_gradcam_confidence_is_the_prediction(lite0, tmp_path):
    photo = tmp_path / "chelsea.png"
    Image.fromarray(skimage.data.chelsea()).save(photo)
    pred = headstart.predict_imagenet([photo], top_k=5)[0]
    cam = explain.gradcam(lite0, photo, target="tabby")  # an ImageNet alias: "tabby, tabby cat"
    assert cam.target == "tabby, tabby cat" and cam.predicted == pred.top[0][0]
    # one inference path: predict (ONNX Runtime fp32) and explain (PyTorch fp32) agree to the printed digit
    assert f"{cam.probability:.2%}" == f"{dict(pred.top)['tabby, tabby cat']:.2%}"
    assert f"{cam.confidence:.2%}" == f"{pred.top[0][1]:.2%}"
    r_pred = CliRunner().invoke(main, ["predict", "--imagenet", str(photo)])
    r_cam = CliRunner().invoke(main, ["explain", "--imagenet", str(photo), "--gradcam", "--out", str(tmp_path / "cam.png")])
    assert r_pred.exit_code == r_cam.exit_code == 0, r_pred.output + r_cam.output
    assert f"{cam.confidence:7.2%}  {cam.predicted}" in r_pred.output and f"({cam.confidence:.1%})" in r_cam.output


@pytest.mark.slow
def test_feature_grid_of_the_first_conv(lite0):
    cat = explain.feature_maps(lite0, skimage.data.chelsea(), count=16)
    coffee = explain.feature_maps(lite0, skimage.data.coffee(), count=16)
    assert cat.layer == "conv_stem" and cat.maps.shape == coffee.maps.shape == (16, 112, 112)
    assert np.abs(cat.maps - coffee.maps).mean() > 0.1 * np.abs(cat.maps).mean()
    tiles = [ax for ax in explain.feature_grid(cat).axes if ax.images]
    assert len(tiles) == 16 + 1  # the channels, and the photo beside them

    many = explain.feature_maps(lite0, skimage.data.chelsea(), layer="blocks.3", count=64)  # 80 channels
    tiles = [ax for ax in explain.feature_grid(many).axes if ax.images][1:]
    assert len(tiles) == 64
    assert len({round(ax.get_position().x0, 3) for ax in tiles}) == 8 == len({round(ax.get_position().y0, 3) for ax in tiles})
    few = explain.feature_maps(lite0, skimage.data.chelsea(), count=64)  # conv_stem has only 32
    assert len(few.maps) == few.channels == 32


@pytest.mark.slow
def test_early_and_late_layers_side_by_side(lite0, tmp_path):
    early = explain.feature_maps(lite0, skimage.data.coffee(), layer="first", count=16)
    late = explain.feature_maps(lite0, skimage.data.coffee(), layer="last", count=16)
    assert (early.layer, late.layer) == ("conv_stem", "bn2") and late.maps.shape[1:] == (7, 7)
    fig = explain.feature_grid(early, late)
    assert sum(bool(ax.images) for ax in fig.axes) == 16 + 16 + 1
    path = explain.save_figure(fig, tmp_path / "side.png")
    assert Image.open(path).size[0] > 800


@pytest.mark.slow
def test_layer_listing_has_shapes_and_the_default(lite0):
    rows = {r.name: r for r in explain.layers(lite0)}
    assert rows["conv_stem"].shape == (32, 112, 112) and rows["conv_stem"].params == 32 * 3 * 3 * 3
    assert rows["bn2"].shape == (1280, 7, 7) and rows["classifier"].shape == (1000,)
    assert explain.default_layer(lite0) == "bn2"
    assert all(r.name.count(".") < 2 for r in explain.layers(lite0, max_depth=2))


def test_mistakes_get_errors_that_say_what_to_do(lite0):
    with pytest.raises(HeadstartError, match=r"no layer 'blocks\.9'.*headstart layers.*Did you mean"):
        explain.gradcam(lite0, skimage.data.coffee(), layer="blocks.9")
    with pytest.raises(HeadstartError, match="not a \\(channels, height, width\\) feature map"):
        explain.feature_maps(lite0, skimage.data.coffee(), layer="classifier")
    with pytest.raises(HeadstartError, match="unknown class 'expresso'.*espresso"):
        explain.gradcam(lite0, skimage.data.coffee(), target="expresso")
    with pytest.raises(HeadstartError, match="cannot read '.*nothere.jpg': no such file"):
        explain.gradcam(lite0, "nothere.jpg")


@pytest.mark.slow  # seconds per backbone, ten for the big ones
@pytest.mark.parametrize("name", list(backbones.REGISTRY))
def test_every_registry_backbone_can_be_explained(name):
    subj = explain.as_subject(backbones.load(name, weights="random"))
    size = tuple(subj.data_config["input_size"][1:])
    image = np.asarray(Image.fromarray(skimage.data.coffee()).resize(size[::-1]))
    rows = {r.name: r for r in explain.layers(subj)}
    first, last = explain.first_conv(subj), explain.default_layer(subj)
    assert len(rows[last].shape) == 3 and rows[last].shape[1] < size[0] / 4  # a late, coarse feature map
    fm = explain.feature_maps(subj, image, count=8)
    assert fm.layer == first and fm.maps.shape == (8, *rows[first].shape[1:]) and np.isfinite(fm.maps).all()
    cam = explain.gradcam(subj, image)
    assert cam.layer == last and cam.heat.shape == size == cam.image.shape[:2]
    assert np.isfinite(cam.heat).all() and 0 <= cam.heat.min() and cam.heat.max() <= 1


@pytest.mark.slow
def test_gradcam_on_a_trained_bundle(ants_run, tmp_path):
    clf, out = ants_run
    bee = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[0]
    pred = clf.predict([bee], top_k=2)[0]
    cam = explain.gradcam(clf, bee)
    assert cam.predicted == pred.top[0][0] and cam.confidence == pytest.approx(pred.top[0][1], abs=0.02)
    other = next(c for c in clf.classes if c != cam.predicted)
    against = explain.gradcam(clf, bee, target=other)
    assert against.probability == pytest.approx(1 - cam.confidence, abs=1e-4)
    assert not np.allclose(against.heat, cam.heat)
    assert cam.heat.max() == against.heat.max() == 1  # neither map blank: a binary head's class 0 has a logit of 0

    thumb = explain.gradcam_thumbnail(clf, bee, size=160)
    assert max(thumb.size) == 160 and thumb.mode == "RGB"

    r = CliRunner().invoke(main, ["explain", str(out), str(bee), "--gradcam"])
    assert r.exit_code == 0, r.output
    png = out / "explain" / f"{bee.stem}-gradcam.png"
    assert f"predicted: {cam.predicted}" in r.output and str(png) in r.output
    with Image.open(png) as img:
        img.load()
        assert img.size[0] > 400
    r = CliRunner().invoke(main, ["explain", str(out), str(bee), "--gradcam", "--class", other, "--out", str(tmp_path / "o.png")])
    assert r.exit_code == 0 and f"Grad-CAM for '{other}'" in r.output and (tmp_path / "o.png").is_file()


def test_the_report_gradcam_from_the_cached_graph_is_pytorchs(ants_run):
    """The report's Grad-CAM overlays come from the cached feature graph with its pooled map as a second output, in
    numpy (no torch): the same photo pixels and the same heat-map as PyTorch's Grad-CAM at the default layer."""
    from headstart.predict import graph_gradcam

    clf, _ = ants_run
    for photo in sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:2] + sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:2]:
        drawn = graph_gradcam(clf, photo)
        assert drawn is not None, "the default backbone's graph ends in a global average pool"
        cam = explain.gradcam(clf, photo)
        assert np.array_equal(drawn[0], cam.image)
        assert np.abs(drawn[1] - cam.heat).max() < 1e-3 and drawn[1].max() == pytest.approx(1)


@pytest.mark.slow
def test_cli_layers_and_feature_maps(ants_run, tmp_path):
    _, out = ants_run
    r = CliRunner().invoke(main, ["layers", str(out), "--depth", "1"])
    assert r.exit_code == 0, r.output
    assert "conv_stem" in r.output and "first conv" in r.output and "Grad-CAM default" in r.output
    # "+ head" in the title, and the head's layers listed: the bundle's, as heads.HEADS defines them
    clf = headstart.load(out)
    r = CliRunner().invoke(main, ["layers", str(out)])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("efficientnet_lite0 + head")
    ops = [op for op, _ in heads.spec_layers(clf.info["head"], len(clf.classes))]
    types = {"standardize": "Standardize", "linear": "Linear", "relu": "ReLU", "dropout": "Dropout"}
    rows = [line.split() for line in lines[lines.index(next(x for x in lines if x.startswith("-- the trained head"))) + 1:]]
    assert [row[:2] for row in rows] == [["head", "Sequential"]] + [[f"head.{i}", types[op]] for i, op in enumerate(ops)]
    assert rows[0][2] == rows[-1][2] == str(len(clf.classes))
    n = sum(p.numel() for p in clf.head.parameters())
    assert rows[0][3] == f"{n:,}" and "," in rows[0][3]  # parameters with thousands separators
    as_json = json.loads(CliRunner().invoke(main, ["layers", str(out), "--json"]).output)
    assert [d["name"] for d in as_json if d["part"] == "head"] == [row[0] for row in rows]
    photo = next((HYMENOPTERA / "val" / "ants").glob("*.jpg"))
    r = CliRunner().invoke(main, ["explain", "--imagenet", str(photo), "--feature-maps", "first", "--feature-maps", "last",
                                  "--count", "16", "--out", str(tmp_path / "f.png")])
    assert r.exit_code == 0, r.output
    assert "conv_stem (Conv2dSame): 16 of 32 channels" in r.output and Image.open(tmp_path / "f.png").size[0] > 800
    r = CliRunner().invoke(main, ["explain", str(out), str(photo)])
    assert r.exit_code == 2 and "choose one view" in r.output
