"""Scanning folders and decoding photos, on the real data sets and on made-up edge cases."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import CLOTHING, HYMENOPTERA, save_image
from headstart.data import HeadstartError, open_rgb, scan, train_val_split


def test_hymenoptera_split_layout_and_quirks():
    ds = scan(HYMENOPTERA)
    assert ds.layout == "splits" and ds.classes == ["ants", "bees"]
    counts = ds.counts()
    # All 124 ant files are listed, the palette GIF and the .jpeg included (ImageFolder would drop the GIF).
    assert counts["train"] == {"ants": 124, "bees": 121} and counts["val"] == {"ants": 70, "bees": 83}
    names = {p.name for p in ds.splits["train"].paths} | {p.name for p in ds.splits["val"].paths}
    assert {"imageNotFound.gif", "formica.jpeg", "ant photos.jpg", "F.pergan.28(f).jpg"} <= names
    gif = open_rgb(HYMENOPTERA / "train/ants/imageNotFound.gif")
    assert gif.mode == "RGB"
    summary = ds.summary()
    assert "ants" in summary and "124" in summary


def test_clothing_validation_folder_and_root_files_are_not_classes():
    ds = scan(CLOTHING)
    assert set(ds.splits) == {"train", "val", "test"}
    assert len(ds.classes) == 10 and "LICENSE" not in ds.classes and "README.md" not in ds.classes
    assert [len(ds.splits[s]) for s in ("train", "val", "test")] == [1000, 225, 214]


def test_class_folders_get_a_seeded_stratified_split(tmp_path):
    for c in ("cats", "dogs"):
        for i in range(10):
            save_image(tmp_path / c / f"{i}.JPG", fmt="JPEG")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    save_image(tmp_path / ".ipynb_checkpoints" / "x.jpg")
    (tmp_path / "notes.txt").write_text("not a class")
    (tmp_path / "cats" / "readme.txt").write_text("not an image")
    ds = scan(tmp_path)
    assert ds.layout == "classes" and ds.classes == ["cats", "dogs"]
    assert [s.reason for s in ds.skipped] == ["not an image extension (.txt)"]
    tr, va, _ = train_val_split(ds, 0.2, seed=3)
    assert len(tr) == 16 and len(va) == 4 and sorted(np.bincount(va.labels)) == [2, 2]
    tr2, va2, _ = train_val_split(ds, 0.2, seed=3)
    assert va2.paths == va.paths
    assert train_val_split(ds, 0.2, seed=4)[1].paths != va.paths


def test_refusals_say_what_to_do(tmp_path):
    save_image(tmp_path / "only" / "a.jpg")
    with pytest.raises(HeadstartError, match="at least two"):
        scan(tmp_path)
    save_image(tmp_path / "Only" / "b.jpg")
    with pytest.raises(HeadstartError, match="differing only in case"):
        scan(tmp_path)
    with pytest.raises(HeadstartError, match="not a folder"):
        scan(tmp_path / "missing")
    for c in ("Cat", "Dog"):  # one folder too high (kagglecatsanddogs/PetImages/<class>): the message names the right one
        save_image(tmp_path / "pets" / "PetImages" / c / "0.jpg")
    with pytest.raises(HeadstartError, match=f"at least two.*give '{tmp_path / 'pets' / 'PetImages'}' instead"):
        scan(tmp_path / "pets")


def test_split_folders_under_other_names_are_never_taken_for_classes(tmp_path):
    """Kaggle's Training/Testing is read as train + test (a validation split drawn from train); split folders under
    names it cannot map (seg_train/seg_train/<class>, seg_test/...) would have made a classifier of the splits
    themselves: refused, naming the folder to give instead. A class merely named like a split is still a class."""
    for split in ("Training", "Testing"):
        for c in ("glioma", "meningioma"):
            for i in range(3):
                save_image(tmp_path / "kaggle" / split / c / f"{i}.jpg", fmt="JPEG")
    ds = scan(tmp_path / "kaggle")
    assert ds.layout == "splits" and ds.classes == ["glioma", "meningioma"] and set(ds.splits) == {"train", "test"}
    for split in ("seg_train", "seg_test"):
        for c in ("forest", "sea"):
            save_image(tmp_path / "intel" / split / split / c / "0.jpg", fmt="JPEG")
    save_image(tmp_path / "intel" / "seg_pred" / "seg_pred" / "1.jpg", fmt="JPEG")
    inner = tmp_path / "intel" / "seg_train" / "seg_train"
    with pytest.raises(HeadstartError, match=f"seg_pred, seg_test, seg_train: split folders .* Rename them train/ .* headstart train '{inner}'"):
        scan(tmp_path / "intel")
    assert scan(inner).classes == ["forest", "sea"]
    for c in ("train_station", "valley"):  # photos right inside, no class folders: classes
        save_image(tmp_path / "places" / c / "0.jpg", fmt="JPEG")
    assert scan(tmp_path / "places").classes == ["train_station", "valley"]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    path = save_image(tmp_path / f"x.{fmt.lower()}", mode=mode, fmt=fmt)
    img = open_rgb(path)
    assert img.mode == "RGB" and img.size == (64, 48)
    if mode == "I;16":  # scaled, not clipped to white
        assert 100 < np.asarray(img).mean() < 160
    if mode == "RGBA":  # half-transparent red on white
        assert tuple(np.asarray(img)[0, 0]) == pytest.approx((227, 142, 142), abs=3)


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (80, 40), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert open_rgb(path).size == (40, 80)


def test_unreadable_files_give_a_reason(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    good = save_image(tmp_path / "good.jpg", size=(300, 300), fmt="JPEG")
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:400])
    for name, reason in [("empty.jpg", "empty file"), ("text.jpg", "text file, not an image"), ("cut.jpg", "truncated|corrupt|decode")]:
        with pytest.raises(ValueError, match=reason):
            open_rgb(tmp_path / name)


def test_large_jpeg_is_decoded_at_reduced_scale_but_not_below_need(tmp_path):
    path = save_image(tmp_path / "big.jpg", size=(2400, 1800), fmt="JPEG")
    img = open_rgb(path, min_size=256)
    assert 256 <= min(img.size) < 900


def test_files_loose_in_a_split_folder_are_named_not_silently_dropped(tmp_path):
    for split, cls in (("train", "ants"), ("train", "bees"), ("val", "ants"), ("val", "bees")):
        save_image(tmp_path / split / cls / "a.jpg")
    save_image(tmp_path / "train" / "stray.jpg")
    (tmp_path / "val" / "notes.txt").write_text("labels to check")
    save_image(tmp_path / "unlabelled" / "u.jpg")  # a folder beside the splits: named, not used
    ds = scan(tmp_path)
    loose = {s.path: s.reason for s in ds.skipped}
    assert set(loose) == {"train/stray.jpg", "val/notes.txt", "unlabelled/"}
    assert loose.pop("unlabelled/") == "not a split folder (train, val, test): ignored"
    assert all("not inside a class folder" in why for why in loose.values())
    assert sum(len(s) for s in ds.splits.values()) == 4  # only the photos in class folders are used
    for cls in ("ants", "bees"):  # class folders at the root: a photo beside them is named too, a README is not
        save_image(tmp_path / "flat" / cls / "a.jpg")
    save_image(tmp_path / "flat" / "stray.jpg")
    (tmp_path / "flat" / "README.md").write_text("about these photos")
    assert [(s.path, s.reason.split(" (")[0]) for s in scan(tmp_path / "flat").skipped] == [("stray.jpg", "not inside a class folder")]

