"""The registry and weight resolution: real package weights, user files, and the offline error."""

from __future__ import annotations

import pytest
import torch
import timm
from PIL import Image

from conftest import WEIGHTS
from headstart import backbones
from headstart.data import HeadstartError
from headstart.predict import predict_imagenet


@pytest.mark.parametrize("typed,name", [("VGG16", "vgg16"), ("ResNet50", "resnet50"), ("InceptionV3", "inception_v3"),
                                        ("MobileNet", "mobilenet"), ("DenseNet121", "densenet121"),
                                        ("EfficientNetB0", "efficientnet_b0"), ("EfficientNet-Lite0", "efficientnet_lite0")])
def test_classic_names(typed, name):
    assert backbones.lookup(typed).name == name


def test_inception_is_299_and_any_timm_name_works():
    assert timm.models.get_pretrained_cfg(backbones.lookup("InceptionV3").timm_name).input_size[-1] == 299
    assert backbones.lookup("convnext_atto").timm_name == "convnext_atto"
    with pytest.raises(HeadstartError, match="unknown backbone 'resnet5000'"):
        backbones.lookup("resnet5000")


def _chelsea_and_coffee(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    cat, coffee = tmp_path / "chelsea.png", tmp_path / "coffee.png"
    Image.fromarray(skimage_data.chelsea()).save(cat)
    Image.fromarray(skimage_data.coffee()).save(coffee)
    return cat, coffee


CATS = {"tiger cat", "Egyptian cat", "tabby, tabby cat", "Persian cat", "Siamese cat, Siamese"}


# Seconds each: the fast tier checks the default backbone's weights, the full suite every packaged file.
@pytest.mark.parametrize("name", ["efficientnet_lite0", *(pytest.param(n, marks=pytest.mark.slow) for n in ("efficientnet_lite1", "efficientnet_lite2"))])
def test_package_weights_are_real_imagenet_weights(tmp_path, name):
    cat, coffee = _chelsea_and_coffee(tmp_path)
    p_cat, p_coffee = predict_imagenet([cat, coffee], backbone=name, top_k=3)
    assert p_cat.top[0][0] in CATS
    assert p_coffee.top[0][0] == "espresso"


@pytest.mark.slow
@pytest.mark.parametrize("name,file", [("mobilenet", "mobilenetv1_100"), ("mobilenetv2", "mobilenetv2_100"),
                                       ("mobilenetv3_small", "tf_mobilenetv3_small_100"), ("regnetx_002", "regnetx_002")])
def test_user_supplied_files_load_strict(tmp_path, name, file):
    cat, coffee = _chelsea_and_coffee(tmp_path)
    p_cat, p_coffee = predict_imagenet([cat, coffee], backbone=name, weights=WEIGHTS / f"{file}.safetensors")
    assert p_cat.top[0][0] in CATS and p_coffee.top[0][0] == "espresso"


def test_any_timm_model_from_a_local_torch_file(tmp_path):
    model = timm.create_model("resnet10t", num_classes=0)
    torch.save(model.state_dict(), tmp_path / "r10.pth")
    lb = backbones.load("resnet10t", weights=tmp_path / "r10.pth")
    assert lb.num_features == 512 and lb.source.startswith("file")
    for k, v in model.state_dict().items():
        assert torch.equal(lb.model.state_dict()[k], v)
    expected = timm.data.resolve_data_config({}, model=timm.create_model("resnet10t"))
    assert lb.data_config["input_size"] == list(expected["input_size"])  # preprocessing comes from timm


def test_wrong_file_for_the_architecture_is_refused(tmp_path):
    torch.save(timm.create_model("resnet10t").state_dict(), tmp_path / "r10.pth")
    with pytest.raises(HeadstartError, match="do not fit backbone 'efficientnet_lite0'"):
        backbones.load("efficientnet_lite0", weights=tmp_path / "r10.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(HeadstartError, match="cannot read weight file"):
        backbones.load("resnet10t", weights=tmp_path / "junk.pth")


def test_offline_without_weights_says_how_to_supply_them(monkeypatch):
    monkeypatch.setattr(backbones, "_reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(backbones, "_hub_cached_file", lambda hub_id: None)
    with pytest.raises(HeadstartError) as e:
        backbones.load("resnet50")
    msg = str(e.value)
    assert "no pretrained weights for backbone 'resnet50'" in msg and "--weights PATH" in msg and "offline" in msg
    assert "resnet50.tv_in1k.safetensors" in msg and "$HEADSTART_WEIGHTS" in msg and "run once online" in msg
    with pytest.raises(HeadstartError) as e:
        backbones.load("mobilenet")  # TF-style MobileNet: only a converted file fits, so the hub is no fix
    msg = str(e.value)
    assert "do not fit" in msg and "mobilenetv1_100.safetensors" in msg and "pad_type='same'" in msg
    assert "online" not in msg


def test_weights_folder_is_searched_by_timm_name(tmp_path, monkeypatch):
    """A file named after the timm model in $HEADSTART_WEIGHTS is found without --weights (and listed as found)."""
    monkeypatch.setenv("HEADSTART_WEIGHTS", f"{tmp_path / 'none'}:{tmp_path / 'w'}")
    spec = backbones.lookup("mobilenetv2")
    assert backbones.availability(spec) == "needs mobilenetv2_100.safetensors"
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "mobilenetv2_100.safetensors").symlink_to(WEIGHTS / "mobilenetv2_100.safetensors")
    assert backbones.availability(spec) == "weights folder: mobilenetv2_100.safetensors"
    lb = backbones.load("mobilenetv2")
    assert "weights folder" in lb.source and lb.digest == backbones.load("mobilenetv2", weights=WEIGHTS / "mobilenetv2_100.safetensors").digest


def test_nasnetmobile_is_known_and_points_to_the_nearest_backbone():
    with pytest.raises(HeadstartError) as e:
        backbones.lookup("NASNetMobile")
    msg = str(e.value)
    assert "timm has no NASNet-Mobile" in msg and "--backbone efficientnet_lite0" in msg and "unknown" not in msg


def test_weights_digest_ignores_file_format(tmp_path):
    from safetensors.torch import save_file

    sd = timm.create_model("resnet10t").state_dict()
    torch.save(sd, tmp_path / "a.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "a.safetensors")
    assert backbones.load("resnet10t", tmp_path / "a.pth").digest == backbones.load("resnet10t", tmp_path / "a.safetensors").digest


def test_remembered_backbone_follows_the_file_content_not_its_name_size_or_time(tmp_path):
    """load_for_training remembers a backbone by its weight file's content: another checkpoint of the same
    architecture copied over it with the same size and time (cp -p, rsync -a) is another backbone."""
    import os

    path = tmp_path / "r10.pth"
    sd = timm.create_model("resnet10t").state_dict()
    torch.save(sd, path)
    first = backbones.load_for_training("resnet10t", weights=path, cache_dir=tmp_path / "cache")
    again = backbones.load_for_training("resnet10t", weights=path, cache_dir=tmp_path / "cache")
    assert again._model is None and again.digest == first.digest  # remembered: nothing built
    st = path.stat()
    sd["conv1.0.weight"] = sd["conv1.0.weight"] * 2
    torch.save(sd, path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    other = backbones.load_for_training("resnet10t", weights=path, cache_dir=tmp_path / "cache")
    assert other.digest != first.digest
    assert torch.equal(other.model.state_dict()["conv1.0.weight"], sd["conv1.0.weight"])


def test_every_input_size_shares_one_remembered_copy_of_the_weights(tmp_path):
    """The size search loads one backbone at three sizes: three records, one weight file (VGG16's is 59 MB)."""
    import numpy as np

    path = tmp_path / "r10.pth"
    torch.save(timm.create_model("resnet10t").state_dict(), path)
    cache = tmp_path / "cache"
    first = [backbones.load_for_training("resnet10t", weights=path, cache_dir=cache, input_size=s) for s in (None, 256, 288)]
    again = [backbones.load_for_training("resnet10t", weights=path, cache_dir=cache, input_size=s) for s in (None, 256, 288)]
    own = first[0].data_config["input_size"][-1]
    assert [lb.data_config["input_size"][-1] for lb in again] == [own, 256, 288]
    assert all(lb._model is None for lb in again)  # remembered: nothing built
    assert len(list((cache / "backbones").rglob("*.safetensors"))) == 1
    built = first[0].state_arrays()
    for lb in again:
        kept = lb.state_arrays()
        assert kept.keys() == built.keys() and all(np.array_equal(kept[k], built[k]) for k in built)
