"""Hostile input and faults.

A corpus of bad files is made at test time from two real photos (nothing binary is committed). Every case has one
documented outcome — the table "Bad input: what happens" in the README — and a test here:

* ``used``: decoded and fixed up (mode converted, EXIF rotation applied, …);
* ``skipped``: not used, and reported by name with a reason;
* ``ignored``: not an image of the data set at all (hidden folders, macOS litter), silently left out;
* ``refused``: the whole folder is refused with a message saying what to do.

Then the whole corpus is mixed into the real ants/bees folders and trained on; and extraction is killed, run twice
at once, and run out of disk.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import HYMENOPTERA, ants_bees
from headstart.data import IMAGE_EXTENSIONS, HeadstartError, open_rgb, scan, train_val_split

ANT = HYMENOPTERA / "train/ants/1030023514_aad5c608f9.jpg"  # 500×333 RGB JPEG
BEE = HYMENOPTERA / "train/bees/1092977343_cb42b38d62.jpg"  # 500×333 RGB JPEG
ROOT = os.geteuid() == 0


# ------------------------------------------------------------------------------------------- the corpus


@dataclass
class Case:
    name: str  # as in the README table
    make: Callable[[Path, Image.Image, Path], list[Path]]  # (class folder, upright photo, its file) -> files made
    outcome: str  # used | skipped | ignored
    reason: str = ""  # for skipped: a regex the reported reason must match
    looks_like: str = ""  # for used: "photo" when the decoded image must match the upright source photo


def _truncated(d: Path, img: Image.Image, src: Path) -> list[Path]:
    data = src.read_bytes()
    return [_write(d / "truncated.jpg", data[: len(data) * 3 // 5])]


def _save(path: Path, img: Image.Image, **kw) -> Path:
    img.save(path, **kw)
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _gray16(d: Path, img: Image.Image, src: Path) -> list[Path]:
    arr = np.asarray(img.convert("L")).astype(np.uint16) * 257
    return [_save(d / "gray16.png", Image.fromarray(arr))]


def _rgba(d: Path, img: Image.Image, src: Path) -> list[Path]:
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(img.size))  # transparent at the top, opaque at the bottom
    return [_save(d / "transparent.png", rgba)]


def _animated(d: Path, img: Image.Image, src: Path) -> list[Path]:
    frames = [img.convert("P", palette=Image.Palette.ADAPTIVE), img.rotate(180).convert("P", palette=Image.Palette.ADAPTIVE)]
    return [_save(d / "animated.gif", frames[0], save_all=True, append_images=frames[1:], duration=200, loop=0)]


def _exif(orientation: int) -> Callable[[Path, Image.Image, Path], list[Path]]:
    # Stored sideways; the EXIF tag says how to turn it upright (6: 90° clockwise, 8: 90° counter-clockwise).
    stored = {6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}[orientation]

    def make(d: Path, img: Image.Image, src: Path) -> list[Path]:
        exif = Image.Exif()
        exif[0x0112] = orientation
        return [_save(d / f"exif{orientation}.jpg", img.transpose(stored), exif=exif, quality=95)]

    return make


def _bomb(d: Path, img: Image.Image, src: Path) -> list[Path]:
    """A 600-byte PNG whose header claims 30 000 × 30 000 pixels: the decompression-bomb shape, made cheaply."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 512)) + chunk(b"IEND", b"")
    return [_write(d / "bomb.png", png)]


def _link(name: str, target: str) -> Callable[[Path, Image.Image, Path], list[Path]]:
    def make(d: Path, img: Image.Image, src: Path) -> list[Path]:
        (d / name).symlink_to(target)
        return [d / name]

    return make


def _unreadable(d: Path, img: Image.Image, src: Path) -> list[Path]:
    path = d / "no-permission.jpg"
    shutil.copyfile(src, path)
    path.chmod(0)
    return [path]


def _copy(name: str) -> Callable[[Path, Image.Image, Path], list[Path]]:
    def make(d: Path, img: Image.Image, src: Path) -> list[Path]:
        path = d / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, path)
        return [path]

    return make


CORPUS: list[Case] = [
    Case("truncated JPEG", _truncated, "skipped", "truncated"),
    Case("zero-byte file", lambda d, img, src: [_write(d / "empty.jpg", b"")], "skipped", "empty file"),
    Case("text file named .jpg (an HTML error page)",
         lambda d, img, src: [_write(d / "download.jpg", b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n")],
         "skipped", "web page, not an image"),
    Case("PNG named .jpg", lambda d, img, src: [_save(d / "really-a-png.jpg", img, format="PNG")], "used", looks_like="photo"),
    Case("CMYK JPEG", lambda d, img, src: [_save(d / "cmyk.jpg", img.convert("CMYK"), quality=95)], "used", looks_like="photo"),
    Case("16-bit grayscale PNG", _gray16, "used"),
    Case("RGBA PNG with transparency", _rgba, "used"),
    Case("palette GIF", lambda d, img, src: [_save(d / "palette.gif", img.convert("P", palette=Image.Palette.ADAPTIVE))], "used", looks_like="photo"),
    Case("animated GIF", _animated, "used", looks_like="photo"),
    Case("EXIF orientation 6", _exif(6), "used", looks_like="photo"),
    Case("EXIF orientation 8", _exif(8), "used", looks_like="photo"),
    Case("1×1 image", lambda d, img, src: [_save(d / "one-pixel.png", img.resize((1, 1)))], "used"),
    Case("image above the decompression-bomb limit", _bomb, "skipped", "decompression-bomb.*HEADSTART_MAX_PIXELS"),
    Case("dangling symlink", _link("moved-away.jpg", "nowhere/gone.jpg"), "skipped", "broken symbolic link"),
    Case("symlink loop", _link("loop.jpg", "loop.jpg"), "skipped", "symbolic link loop"),
    # Root reads any file, so as root this one is simply used; test_permission_denied_as_another_user checks the rest.
    Case("unreadable file (chmod 000)", _unreadable, "used" if ROOT else "skipped", "permission denied"),
    Case("non-UTF-8 file name", _copy(os.fsdecode(b"fourmi-\xe9t\xe9-latin1.jpg")), "used", looks_like="photo"),
    Case("undecodable file with a non-UTF-8 name", lambda d, img, src: [_write(d / os.fsdecode(b"r\xe9sum\xe9.jpg"), bytes(range(256)))],
         "skipped", "not an image Pillow can decode"),
    Case("unicode file name", _copy("蟻 été ✓.jpg"), "used", looks_like="photo"),
    Case("upper-case extension", _copy("SHOUTING.JPEG"), "used", looks_like="photo"),
    Case("not an image extension (notes.txt)", lambda d, img, src: [_write(d / "notes.txt", b"taken on holiday\n")],
         "skipped", r"not an image extension \(\.txt\)"),
    Case("hidden folder (.ipynb_checkpoints)", _copy(".ipynb_checkpoints/photo-checkpoint.jpg"), "ignored"),
    Case(".DS_Store file", lambda d, img, src: [_write(d / ".DS_Store", b"\0\0\0\1Bud1" + bytes(64))], "ignored"),
    Case("Thumbs.db (Windows litter)", lambda d, img, src: [_write(d / "Thumbs.db", bytes(range(64)))], "ignored"),
    Case("macOS resource fork (._photo.jpg)", lambda d, img, src: [_write(d / "._photo.jpg", b"\0\5\26\7" + bytes(60))], "ignored"),
]


def write_corpus(folders: list[tuple[Path, Path]]) -> list[tuple[Case, list[Path]]]:
    """Every case, round-robin over (class folder, source photo) pairs; returns what was made where."""
    made = []
    for i, case in enumerate(CORPUS):
        folder, src = folders[i % len(folders)]
        folder.mkdir(parents=True, exist_ok=True)
        made.append((case, case.make(folder, Image.open(src).convert("RGB"), src)))
    return made


def _decode(path: Path) -> Image.Image | str:
    try:
        return open_rgb(path)
    except ValueError as e:
        return str(e)


def _diff(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference at a common small size (0 = identical, 255 = opposite)."""
    size = (64, 43)
    return float(np.abs(np.asarray(a.resize(size), float) - np.asarray(b.resize(size), float)).mean())


@pytest.fixture(scope="module")
def lite0():
    from headstart import backbones

    return backbones.load("efficientnet_lite0")


# ---------------------------------------------------------------------------------- every case, one by one


def test_corpus_is_big_enough_and_names_are_unique():
    assert len(CORPUS) >= 20 and len({c.name for c in CORPUS}) == len(CORPUS)


def test_every_case_has_its_documented_outcome(tmp_path, lite0):
    from headstart.transforms import eval_transform

    made = write_corpus([(tmp_path / "ants", ANT), (tmp_path / "bees", BEE)])
    ds = scan(tmp_path)
    listed = set(ds.splits["all"].paths)
    at_scan = {s.path: s.reason for s in ds.skipped}
    to_tensor = eval_transform(lite0.data_config)
    for case, files in made:
        for f in files:
            rel = str(f.relative_to(tmp_path))
            if case.outcome == "ignored":
                assert f not in listed and rel not in at_scan, case.name
                continue
            got = _decode(f) if f in listed else at_scan[rel]
            if case.outcome == "skipped":
                assert isinstance(got, str), f"{case.name}: decoded, but should be skipped"
                assert re.search(case.reason, got), f"{case.name}: reason {got!r}"
                continue
            assert isinstance(got, Image.Image) and got.mode == "RGB", f"{case.name}: {got}"
            assert to_tensor(got).shape == (3, 224, 224), case.name
            upright = Image.open(ANT if "ants" in rel else BEE).convert("RGB")
            if case.looks_like == "photo":
                assert got.size == upright.size and _diff(got, upright) < 12, f"{case.name}: {_diff(got, upright):.1f}"
    by_name = {c.name: files for c, files in made}
    gray = open_rgb(by_name["16-bit grayscale PNG"][0])  # scaled from 16 bits, not clipped to white
    assert _diff(gray, Image.open(BEE).convert("L").convert("RGB")) < 2
    flat = np.asarray(open_rgb(by_name["RGBA PNG with transparency"][0]), float)  # transparent top → white
    photo = np.asarray(Image.open(ANT if "ants" in str(by_name["RGBA PNG with transparency"][0]) else BEE).convert("RGB"), float)
    assert flat[0].mean() > 254 and np.abs(flat[-1] - photo[-1]).mean() < 3  # …opaque bottom → the photo
    assert open_rgb(by_name["1×1 image"][0]).size == (1, 1)


def test_permission_denied_as_another_user():
    """Root reads everything, so this test drops to user 'nobody' for the one call that must be refused."""
    folder = Path(tempfile.mkdtemp(prefix="headstart-perm-"))  # pytest's tmp is private to its user
    try:
        folder.chmod(0o755)
        path = _unreadable(folder, Image.new("RGB", (1, 1)), ANT)[0]
        if ROOT:
            os.seteuid(65534)
        try:
            got = _decode(path)
        finally:
            if ROOT:
                os.seteuid(0)
        assert isinstance(got, str) and "permission denied" in got and "chmod" in got
    finally:
        shutil.rmtree(folder)


def test_file_deleted_after_listing_is_skipped(tmp_path):
    for c, photo in (("ants", ANT), ("bees", BEE)):
        _copy(f"{c}/a.jpg")(tmp_path, Image.new("RGB", (1, 1)), photo)
    ds = scan(tmp_path)
    ds.splits["all"].paths[0].unlink()
    assert _decode(ds.splits["all"].paths[0]) == "no such file (a mistyped path, or moved or deleted since the folder was listed)"


def test_empty_class_folder_is_ignored_and_noted(tmp_path):
    for c, photo in (("ants", ANT), ("bees", BEE)):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "train" / c / "a.jpg").symlink_to(photo)
    (tmp_path / "train" / "wasps").mkdir()
    (tmp_path / "__MACOSX" / "train").mkdir(parents=True)  # what unzipping a macOS archive leaves
    ds = scan(tmp_path)
    assert ds.classes == ["ants", "bees"]
    assert [(s.path, s.reason) for s in ds.skipped] == [("train/wasps/", "empty class folder (ignored)")]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")  # val holds no wasp: expected
def test_class_with_one_image_trains_and_class_with_no_readable_image_is_refused(tmp_path):
    import headstart

    photos = {c: sorted((HYMENOPTERA / "train" / c).glob("*.jpg"))[:4] for c in ("ants", "bees")}
    for c, files in photos.items():
        for f in files:
            (tmp_path / c).mkdir(exist_ok=True)
            (tmp_path / c / f.name).symlink_to(f)
    (tmp_path / "wasps").mkdir()
    (tmp_path / "wasps" / "w.jpg").symlink_to(HYMENOPTERA / "val/bees/10870992_eebeeb3a12.jpg")
    ds = scan(tmp_path)
    tr, va, _ = train_val_split(ds, 0.25, seed=0)
    assert np.bincount(tr.labels).tolist() == [3, 3, 1] and np.bincount(va.labels, minlength=3).tolist() == [1, 1, 0]
    clf = headstart.train(tmp_path, progress=False, val_fraction=0.25, head="linear")
    assert clf.classes == ["ants", "bees", "wasps"] and clf.info["metrics"]["val"]["n"] == 2

    (tmp_path / "wasps" / "w.jpg").unlink()
    (tmp_path / "wasps" / "w.jpg").write_bytes(b"")
    with pytest.raises(HeadstartError, match="wasps have no readable training images.*remove the folder"):
        headstart.train(tmp_path, progress=False, val_fraction=0.25, head="linear")


# ------------------------------------------------------------------ acceptance: the corpus inside real data


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "scratch"])
def test_counts_tell_listed_from_used(tmp_path, backbone):
    """Two truncated photos in train/ants and one in val/bees: data_summary.txt and config.json say 10 listed,
    8 used, 2 skipped for train/ants (not 10 images), whether the photos were embedded (a pretrained backbone)
    or trained on directly (scratch, which extracts no training embeddings)."""
    import json

    import headstart

    data = tmp_path / "small"
    ants_bees(data, {"train": 8, "val": 5})
    bad = [_truncated(data / "train/ants", None, ANT)[0], _write(data / "train/ants/half.jpg", BEE.read_bytes()[:3000]),
           _truncated(data / "val/bees", None, BEE)[0]]
    headstart.train(data, out=tmp_path / "run", progress=False, backbone=backbone,
                    **({"scratch_epochs": 1} if backbone == "scratch" else {"head": "linear"}))

    d = json.loads((tmp_path / "run" / "config.json").read_text())["data"]
    assert "counts" not in d
    assert d["listed"] == {"train": {"ants": 10, "bees": 8}, "val": {"ants": 5, "bees": 6}}
    assert d["used"] == {"train": {"ants": 8, "bees": 8}, "val": {"ants": 5, "bees": 5}}
    assert sorted(s["path"] for s in d["skipped"]) == sorted(str(p.relative_to(data)) for p in bad)
    lines = (tmp_path / "run" / "data_summary.txt").read_text().splitlines()
    header = next(line for line in lines if line.startswith("class"))
    assert header.split() == ["class"] + ["listed", "used", "skipped"] * 2
    table = {line.split()[0]: [int(x) for x in line.split()[1:]] for line in lines if line.split()[0] in ("ants", "bees", "total")}
    assert table == {"ants": [10, 8, 2, 5, 5, 0], "bees": [8, 8, 0, 6, 5, 1], "total": [18, 16, 2, 11, 10, 1]}
    page = (tmp_path / "run" / "report.html").read_text()
    assert "<td>8 of 10</td>" in page and "<td>16 of 18</td>" in page and "<td>10 of 11</td>" in page


@pytest.mark.slow
def test_training_on_hymenoptera_with_the_whole_corpus_mixed_in(ants_run, tmp_path):
    """Finishes, names every bad file with its reason, and scores as the clean set does (± 1 image)."""
    import headstart

    data = tmp_path / "hymenoptera"
    for f in HYMENOPTERA.rglob("*"):
        if f.is_file() and f.parent != HYMENOPTERA:
            (data / f.relative_to(HYMENOPTERA)).parent.mkdir(parents=True, exist_ok=True)
            (data / f.relative_to(HYMENOPTERA)).symlink_to(f)
    made = write_corpus([(data / "train/ants", ANT), (data / "train/bees", BEE)])
    bad_val = [(c, c.make(data / "val/bees", Image.open(BEE).convert("RGB"), BEE)) for c in CORPUS if c.outcome == "skipped"]
    (data / "train/wasps").mkdir()  # an empty class folder
    (data / "__MACOSX/train/ants").mkdir(parents=True)
    (data / "__MACOSX/train/ants/._x.jpg").write_bytes(bytes(64))

    clf = headstart.train(data, out=tmp_path / "run", progress=False)

    reported = {s["path"]: s["reason"] for s in clf.info["data"]["skipped"]}
    expected = {"train/wasps/": "empty class folder"}
    for case, files in made + bad_val:
        for f in files:
            rel = str(f.relative_to(data))
            if case.outcome == "skipped":
                expected[rel] = case.reason
            else:
                assert rel not in reported, f"{case.name} should be {case.outcome}, but was reported"
    assert set(reported) == set(expected)
    for path, pattern in expected.items():
        assert re.search(pattern, reported[path]), (path, reported[path])
    summary = (tmp_path / "run" / "data_summary.txt").read_text(encoding="utf-8")
    for path in reported:
        assert path.encode("utf-8", "backslashreplace").decode() in summary

    listed = [f for c, files in made if c.outcome != "ignored" for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    assert sum(clf.info["data"]["listed"]["train"].values()) == 245 + len(listed)
    unreadable = sum(c.outcome == "skipped" for c, files in made for f in files if f in listed)
    assert sum(clf.info["data"]["used"]["train"].values()) == 245 + len(listed) - unreadable
    clean_clf, _ = ants_run
    clean, mixed = clean_clf.info["metrics"]["val"], clf.info["metrics"]["val"]
    assert mixed["n"] == clean["n"] == 153
    assert abs(mixed["accuracy"] - clean["accuracy"]) * 153 <= 1 + 1e-9, (clean["accuracy"], mixed["accuracy"])


# --------------------------------------------------------------------------------------------------- faults


_EXTRACT = """
import sys
from pathlib import Path
from headstart import backbones, features
paths = [Path(p) for p in Path(sys.argv[1]).read_text().splitlines()]
lb = backbones.load("efficientnet_lite0")
features.extract(paths, lb, cache_dir=sys.argv[2], batch_size=int(sys.argv[3]), workers=0, progress=False)
"""


def _extract_in_subprocess(paths: list[Path], cache: Path, listing: Path, batch_size: int = 4):
    import subprocess
    import sys

    import headstart

    listing.write_text("\n".join(map(str, paths)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(Path(headstart.__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", _EXTRACT, str(listing), str(cache), str(batch_size)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _entries(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*.npy"))


def _assert_entries_whole(cache: Path, dim: int) -> None:
    for e in _entries(cache):
        v = np.load(e, allow_pickle=False)
        assert v.shape == (dim,) and v.dtype == np.float32 and np.isfinite(v).all(), e


@pytest.mark.slow
def test_killed_extraction_resumes_with_only_the_missing_embeddings(tmp_path, lite0):
    import signal
    import time

    from headstart import features

    paths = scan(HYMENOPTERA).splits["val"].paths[:32]
    cache = tmp_path / "cache"
    proc = _extract_in_subprocess(paths, cache, tmp_path / "list.txt")
    deadline = time.monotonic() + 300
    while len(_entries(cache)) < 8 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    done = len(_entries(cache))
    assert 8 <= done < 32  # killed mid-way
    _assert_entries_whole(cache, lite0.num_features)  # whatever is there is whole (temporary files are not entries)

    resumed = features.extract(paths, lite0, cache_dir=cache, workers=0, progress=False)
    assert resumed.ok.all() and resumed.computed == 32 - done
    assert features.extract(paths, lite0, cache_dir=cache, workers=0, progress=False).computed == 0


@pytest.mark.slow
def test_two_processes_extracting_into_one_cache_at_once(tmp_path, lite0):
    from headstart import features

    paths = scan(HYMENOPTERA).splits["val"].paths[40:52]
    cache = tmp_path / "cache"
    procs = [_extract_in_subprocess(paths, cache, tmp_path / f"list{i}.txt") for i in range(2)]
    for p in procs:
        assert p.wait() == 0, p.stdout.read().decode()[-2000:]
    assert len(_entries(cache)) == 12
    _assert_entries_whole(cache, lite0.num_features)
    assert [p.name for p in cache.rglob("*") if p.name.startswith(".")] == []  # no temporary file left behind
    shared = features.extract(paths, lite0, cache_dir=cache, workers=0, progress=False)
    assert shared.computed == 0
    fresh = features.extract(paths[:3], lite0, use_cache=False, workers=0, progress=False)
    np.testing.assert_allclose(shared.x[:3], fresh.x, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_full_disk_fails_clearly_and_keeps_earlier_entries(tmp_path, lite0, monkeypatch):
    import errno

    from headstart import features

    paths = scan(HYMENOPTERA).splits["val"].paths[60:72]
    real_save, saved = np.save, []

    def save_until_full(file, arr, **kw):
        if len(saved) == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(1)
        real_save(file, arr, **kw)

    monkeypatch.setattr(np, "save", save_until_full)
    with pytest.raises(HeadstartError, match="disk full while writing .*free some space and run again"):
        features.extract(paths, lite0, cache_dir=tmp_path, batch_size=4, workers=0, progress=False)
    monkeypatch.undo()
    assert len(_entries(tmp_path)) == 5
    _assert_entries_whole(tmp_path, lite0.num_features)
    assert [p.name for p in tmp_path.rglob("*") if p.name.startswith(".")] == []
    assert features.extract(paths, lite0, cache_dir=tmp_path, workers=0, progress=False).computed == 7


def test_full_disk_while_saving_a_bundle_keeps_the_previous_one(ants_run, tmp_path, monkeypatch):
    import errno

    import headstart
    from headstart import predict

    clf, out = ants_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(predict, "save_file", full)
    with pytest.raises(HeadstartError, match="disk full while writing .*model.safetensors"):
        clf.save(copy)
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before
    monkeypatch.undo()
    assert headstart.load(copy).classes == ["ants", "bees"]


@pytest.mark.slow
def test_pickled_cache_entry_is_never_unpickled(tmp_path, lite0):
    """A cache entry replaced by a pickle that would run code: it is ignored and recomputed, the code never runs."""
    from headstart import features

    path = scan(HYMENOPTERA).splits["val"].paths[0]
    features.extract([path], lite0, cache_dir=tmp_path, progress=False)
    (entry,) = _entries(tmp_path)
    marker = tmp_path / "pwned"
    np.save(entry, np.array([_Exploit(str(marker))], dtype=object), allow_pickle=True)
    again = features.extract([path], lite0, cache_dir=tmp_path, progress=False)
    assert again.computed == 1 and again.ok.all() and not marker.exists()
    assert np.load(entry, allow_pickle=False).shape == (lite0.num_features,)  # rewritten whole


class _Exploit:
    """Unpickling this creates a file: the proof that something unpickled it."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


# ------------------------------------------------------------------------------------------ property tests

# (numpy dtype, channels) → the Pillow mode fromarray gives: 1, 2, 3 and 4 channels; 8, 16 and 32 bits; floats.
_ARRAYS = [("uint8", 0), ("uint8", 2), ("uint8", 3), ("uint8", 4), ("uint16", 0), ("int32", 0), ("float32", 0), ("bool", 0)]
_CONVERTED = ["1", "P", "PA", "CMYK", "YCbCr", "HSV", "LAB", "I;16", "RGBa", "La"]


@st.composite
def encoded_images(draw) -> bytes:
    w, h = draw(st.integers(1, 400)), draw(st.integers(1, 400))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    if draw(st.booleans()):
        dtype, c = draw(st.sampled_from(_ARRAYS))
        shape = (h, w, c) if c else (h, w)
        scale = {"uint8": 256, "uint16": 65536, "int32": 2**20, "float32": 300.0, "bool": 2}[dtype]
        arr = (rng.random(shape) * scale).astype(dtype)
        img = Image.fromarray(arr)
    else:
        base = Image.fromarray((rng.random((h, w, 3)) * 256).astype("uint8"))
        try:
            img = base.convert(draw(st.sampled_from(_CONVERTED)))
        except (ValueError, OSError):
            assume(False)
    buf = io.BytesIO()
    try:
        img.save(buf, format=draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])))
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # this format cannot hold this mode: not a file anyone can have
    data = buf.getvalue()
    if draw(st.integers(0, 4)) == 0:  # sometimes cut short, as an interrupted download would be
        data = data[: draw(st.integers(0, len(data)))]
    return data


@pytest.fixture(scope="module")
def to_model_input(lite0):
    from headstart.transforms import decode_size, eval_transform

    tf, size = eval_transform(lite0.data_config), decode_size(lite0.data_config)
    return lambda data: tf(open_rgb(data, size))


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much])
@given(data=st.one_of(encoded_images(), st.binary(max_size=64)))
def test_any_file_becomes_a_model_input_or_a_reason(to_model_input, data):
    try:
        t = to_model_input(data)
    except ValueError as e:
        assert len(str(e)) > 10  # a reason a person can read, not an empty message
        return
    assert t.shape == (3, 224, 224) and t.dtype.is_floating_point and bool(t.isfinite().all())
