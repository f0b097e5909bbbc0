"""Folders of photos in, lists of (path, label) out; and one robust way to decode a photo.

Two layouts are understood:

* class folders: ``ROOT/<class>/*.jpg`` (a validation split is then drawn, stratified and seeded);
* split folders: ``ROOT/train/<class>/…`` plus ``val``/``valid``/``validation``/``dev`` and optionally ``test``
  (``training``/``testing`` too, any case). Top folders that look like splits under other names (``seg_train``,
  ``test_set``) are refused rather than taken for classes.

Photos are never decoded here; a file that turns out unreadable is reported (path and reason) and skipped
by whoever decodes it, never a crash and never silence.
"""

from __future__ import annotations

import errno
import io
import os
import random
import struct
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from .config import HeadstartError  # defined at the bottom layer; re-exported here, where callers have always found it

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val",
               "test": "test", "testing": "test"}

# Pillow's decompression-bomb guard stays on (a 1 GB-pixel "photo" is an attack or a mistake), but is
# adjustable for people with genuinely huge scans.
Image.MAX_IMAGE_PIXELS = int(os.environ.get("HEADSTART_MAX_PIXELS", 89_478_485))
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is reported, not silently padded with grey


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass
class Split:
    paths: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, keep: list[int]) -> "Split":
        return Split([self.paths[i] for i in keep], [self.labels[i] for i in keep])


@dataclass
class Dataset:
    root: Path
    classes: list[str]
    splits: dict[str, Split]
    skipped: list[Skipped] = field(default_factory=list)
    layout: str = "classes"  # or "splits"

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, split in self.splits.items():
            c = Counter(split.labels)
            out[name] = {cls: c.get(i, 0) for i, cls in enumerate(self.classes)}
        return out

    def summary(self) -> str:
        return summarize(self.classes, self.splits, self.skipped, self.root)


def tally(classes: list[str], splits: dict[str, Split], skipped: list[Skipped], root: Path | None = None) -> dict[str, dict[str, dict[str, int]]]:
    """Images per split and class, two ways: ``listed`` (the image files found, each in its split) and ``used``
    (those not skipped as unreadable: what the run learned from or was measured on). ``skipped`` paths are as
    reported (relative to ``root``); files skipped while scanning were never listed, so they change neither."""
    gone = {s.path for s in skipped}
    out: dict[str, dict[str, dict[str, int]]] = {"listed": {}, "used": {}}
    for name, split in splits.items():
        listed = Counter(split.labels)
        used = Counter(y for p, y in zip(split.paths, split.labels) if (_rel(Path(p), root) if root else str(p)) not in gone)
        out["listed"][name] = {c: listed.get(i, 0) for i, c in enumerate(classes)}
        out["used"][name] = {c: used.get(i, 0) for i, c in enumerate(classes)}
    return out


def summarize(classes: list[str], splits: dict[str, Split], skipped: list[Skipped], root: Path | None = None) -> str:
    """data_summary.txt: per split, images listed, used and skipped (unreadable) for each class and in total,
    then every skipped file with its reason."""
    t = tally(classes, splits, skipped, root)
    names, kinds = list(splits), ("listed", "used", "skipped")
    width = max([len(c) for c in classes] + [5])

    def line(label: str, nums: list[int]) -> str:
        return f"{label:<{width}}" + "".join(f"{n:>9}" for n in nums)

    def row(cls: str | None) -> list[int]:
        nums = []
        for n in names:
            listed, used = (t[k][n][cls] if cls else sum(t[k][n].values()) for k in ("listed", "used"))
            nums += [listed, used, listed - used]
        return nums

    lines = ["listed: image files found; used: decoded and used; skipped: listed but unreadable" + (" (named below)" if skipped else ""),
             f"{'':<{width}}" + "".join(f"{n:>{9 * len(kinds)}}" for n in names),
             f"{'class':<{width}}" + "".join(f"{k:>9}" for _ in names for k in kinds)]
    lines += [line(c, row(c)) for c in classes] + [line("total", row(None))]
    if skipped:
        lines.append(f"skipped {len(skipped)} file(s):")
        lines += [f"  {s.path}: {s.reason}" for s in skipped]
    return "\n".join(lines)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__") or name == "Thumbs.db"


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _image_files(folder: Path, root: Path, skipped: list[Skipped]) -> list[Path]:
    """Images under ``folder`` (recursively, sorted), noting anything else found there."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            if _is_hidden(name):
                continue
            path = Path(dirpath) / name
            if path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(path)
            else:
                skipped.append(Skipped(_rel(path, root), f"not an image extension ({path.suffix or 'none'})"))
    return found


def _loose_files(folders: dict[str, Path], root: Path) -> list[Skipped]:
    """Files lying directly in a split folder (train/, val/ …), outside every class folder: named, not used."""
    return [Skipped(_rel(p, root), "not inside a class folder (ignored): move it into its class's folder")
            for folder in folders.values() for p in sorted(folder.iterdir()) if p.is_file() and not _is_hidden(p.name)]


def _rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def scan(root: str | os.PathLike, classes: list[str] | None = None) -> Dataset:
    """List a labelled folder without decoding anything.

    ``classes`` fixes the class list (as when evaluating a trained model on another folder); a folder
    with a class the model does not know is refused.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise HeadstartError(f"'{root}' is not a folder: give a folder with one sub-folder per class")
    layout, folders = _layout(root)
    skipped: list[Skipped] = []
    per_split = {split: {d.name: _image_files(d, root, skipped) for d in _subdirs(folder)} for split, folder in folders.items()}
    if layout == "splits":
        skipped += _loose_files(folders, root)
        skipped += [Skipped(p.name + "/", "not a split folder (train, val, test): ignored") for p in _subdirs(root) if p not in folders.values()]
    else:  # photos beside the class folders (a README or LICENSE there is no photo and no class: not listed)
        skipped += [s for s in _loose_files(folders, root) if Path(s.path).suffix.lower() in IMAGE_EXTENSIONS]
    found = sorted({c for by_class in per_split.values() for c in by_class})
    _refuse_case_clashes(found, root)
    if classes is None:
        classes = _classes_with_images(root, found, folders, per_split, skipped)
    else:
        _refuse_unknown(root, found, classes, per_split)
    index = {c: i for i, c in enumerate(classes)}
    splits = {}
    for split, by_class in per_split.items():
        s = Split()
        for c, paths in sorted(by_class.items()):
            if c in index:
                s.paths += paths
                s.labels += [index[c]] * len(paths)
        splits[split] = s
    return Dataset(root=root, classes=classes, splits=splits, skipped=skipped, layout=layout)


def _layout(root: Path) -> tuple[str, dict[str, Path]]:
    """("splits", {split: folder}) when the top level holds train/ (or only split folders), else ("classes", {"all": root})."""
    top = _subdirs(root)
    split_dirs = {SPLIT_NAMES[p.name.lower()]: p for p in top if p.name.lower() in SPLIT_NAMES}
    if "train" in split_dirs or ("val" in split_dirs or "test" in split_dirs) and len(split_dirs) == len(top):
        return "splits", split_dirs
    _refuse_unknown_split_names(root, top)
    return "classes", {"all": root}


def _refuse_unknown_split_names(root: Path, top: list[Path]) -> None:
    """Split folders under names not in SPLIT_NAMES (``seg_train/`` + ``seg_test/``, ``training_set/`` +
    ``test_set/``) would otherwise train a classifier of the splits themselves, each "class" holding the real
    class folders: refused, with the two ways out."""
    def says(p: Path, *words: str) -> bool:
        return any(w in p.name.lower() for w in words)

    trainish = [p for p in top if says(p, "train") and _subdirs(p)]
    if not trainish or not any(says(p, "test", "val") for p in top if p not in trainish):
        return
    inner = trainish[0]
    while len(_subdirs(inner)) == 1 and not any(f.is_file() for f in inner.iterdir()):  # training_set/training_set/<class>
        inner = _subdirs(inner)[0]
    raise HeadstartError(
        f"'{root}' holds {', '.join(p.name for p in top)}: split folders under names headstart does not know, not "
        f"classes. Rename them train/ and val/ (or test/), or give the training photos alone: headstart train "
        f"'{inner}' (a validation split is then drawn from them)")


def _classes_with_images(root: Path, found: list[str], folders: dict[str, Path], per_split: dict[str, dict[str, list[Path]]],
                         skipped: list[Skipped]) -> list[str]:
    """The class folders that hold images (empty ones are noted as skipped); fewer than two is refused."""
    empty = [c for c in found if not any(by_class.get(c) for by_class in per_split.values())]
    for c in empty:
        where = [_rel(folders[s] / c, root) for s, by_class in per_split.items() if c in by_class]
        skipped += [Skipped(w + "/", "empty class folder (ignored)") for w in where]
    classes = [c for c in found if c not in empty]
    if len(classes) < 2:
        inside = [folders[s] / classes[0] for s in folders if classes and (folders[s] / classes[0]).is_dir()]
        hint = f"; its sub-folders look like the classes: give '{inside[0]}' instead" if inside and len(_subdirs(inside[0])) >= 2 else ""
        raise HeadstartError(
            f"'{root}' has {len(classes)} class folder(s) with images ({', '.join(classes) or 'none'}): "
            f"a classifier needs at least two, one sub-folder per class{hint}"
        )
    return classes


def _refuse_unknown(root: Path, found: list[str], classes: list[str], per_split: dict[str, dict[str, list[Path]]]) -> None:
    unknown = [c for c in found if c not in classes and any(by_class.get(c) for by_class in per_split.values())]
    if unknown:
        raise HeadstartError(
            f"'{root}' has class folder(s) the model was not trained on: {', '.join(unknown)}; "
            f"it knows {', '.join(classes)}"
        )


def _refuse_case_clashes(names: list[str], root: Path) -> None:
    seen: dict[str, str] = {}
    for n in names:
        if n.lower() in seen:
            raise HeadstartError(
                f"'{root}' has class folders differing only in case: '{seen[n.lower()]}' and '{n}'; "
                "merge them or rename one (they would be the same folder on macOS and Windows)"
            )
        seen[n.lower()] = n


def read_exclude(file: str | os.PathLike, root: Path) -> set[Path]:
    """The photos an exclude list names (``headstart audit``'s exclude.txt, edited by a person): one path per line,
    relative to the data folder or absolute; ``#`` starts a comment, also after a path (``path  # why``)."""
    try:
        text = Path(file).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise HeadstartError(f"cannot read the exclude list '{file}' ({e.strerror or e}): give the exclude.txt written by headstart audit") from None
    paths = set()
    for line in text.splitlines():
        entry = line.split("  #", 1)[0].strip()
        if entry and not entry.startswith("#"):
            paths.add(os.path.normpath(root / entry))
    return {Path(p) for p in paths}


def without(ds: Dataset, excluded: set[Path]) -> tuple[Dataset, int]:
    """The data set less the excluded photos (nothing on disk changes), and how many of them it held."""
    if not excluded:
        return ds, 0
    splits, dropped = {}, 0
    for name, split in ds.splits.items():
        keep = [i for i, p in enumerate(split.paths) if Path(os.path.normpath(p)) not in excluded]
        dropped += len(split) - len(keep)
        splits[name] = split.subset(keep)
    return Dataset(ds.root, ds.classes, splits, ds.skipped, ds.layout), dropped


def train_val_split(ds: Dataset, val_fraction: float = 0.2, seed: int = 0) -> tuple[Split, Split, Split | None]:
    """(train, val, test) for training: the folder's own splits, or a seeded stratified draw from its images.

    Each class keeps at least one training image; a class with a single image goes to train only.
    """
    if ds.layout == "splits":
        if "train" not in ds.splits:
            raise HeadstartError(f"'{ds.root}' has split folders but no 'train/': add one to train on")
        train = ds.splits["train"]
        test = ds.splits.get("test")
        val = ds.splits.get("val")
        if val is None:
            train, val = _stratified(train, val_fraction, seed)
        return train, val, test
    train, val = _stratified(ds.splits["all"], val_fraction, seed)
    return train, val, None


def _stratified(split: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    rng = random.Random(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(split.labels):
        by_class.setdefault(y, []).append(i)
    train_idx, val_idx = [], []
    for y in sorted(by_class):
        idx = by_class[y][:]
        rng.shuffle(idx)
        n_val = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
        val_idx += idx[:n_val]
        train_idx += idx[n_val:]
    return split.subset(sorted(train_idx)), split.subset(sorted(val_idx))


# --------------------------------------------------------------------------------------------- decoding


def open_rgb(source: str | os.PathLike | bytes, min_size: int | None = None) -> Image.Image:
    """Decode any photo to an upright 8-bit RGB image, or raise ``ValueError`` with a readable reason.

    ``min_size``: the smallest side the caller needs; large JPEGs are then decoded at a reduced scale
    (Pillow's draft mode, up to 8× less work) but never below it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            fp = io.BytesIO(source) if isinstance(source, bytes) else source
            img = Image.open(fp)
            if min_size and img.format == "JPEG":
                w, h = img.size
                scale = min(w, h) / min_size
                if scale >= 2:
                    img.draft("RGB", (max(1, int(w / scale)) + 1, max(1, int(h / scale)) + 1))
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(
            f"larger than {Image.MAX_IMAGE_PIXELS:,} pixels (decompression-bomb guard); "
            "shrink it, or raise HEADSTART_MAX_PIXELS if it is genuine"
        ) from None
    except FileNotFoundError:
        if isinstance(source, (str, os.PathLike)) and os.path.islink(source):
            raise ValueError("broken symbolic link (its target is missing)") from None
        raise ValueError("no such file (a mistyped path, or moved or deleted since the folder was listed)") from None
    except PermissionError:
        raise ValueError("permission denied (not readable by this user): fix with chmod, or remove it") from None
    except Image.UnidentifiedImageError:
        raise ValueError(_not_an_image(source)) from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ValueError("symbolic link loop (the link points back to itself)") from None
        msg = str(e)
        if "truncated" in msg.lower() or "broken data stream" in msg.lower():
            raise ValueError(f"truncated or corrupt image data ({msg})") from None
        raise ValueError(f"cannot decode ({msg})") from None
    except (SyntaxError, ValueError, EOFError, struct.error) as e:
        raise ValueError(f"corrupt image ({e})") from None


def _not_an_image(source: str | os.PathLike | bytes) -> str:
    """Why Pillow found no image: the three usual culprits named, so the user knows what they are looking at."""
    try:
        if isinstance(source, bytes):
            head = source[:512]
        else:
            with open(source, "rb") as f:
                head = f.read(512)
    except OSError:
        head = b"?"
    if not head:
        return "empty file (0 bytes): an interrupted copy or download; remove it or copy it again"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as e:  # binary, unless only a character cut at the 512-byte mark
        text = head[: e.start].decode("utf-8") if e.start >= len(head) - 3 else ""
    if text and "\0" not in text:
        what = "a web page" if text.lstrip().lower().startswith(("<!doctype", "<html", "<?xml")) else "a text file"
        return f"{what}, not an image (saved under an image name); remove it"
    return "not an image Pillow can decode (corrupt, or another file type under an image name)"


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: 16-bit scaled (not clipped), transparency flattened onto white."""
    if img.mode == "RGB":
        img.load()
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info or img.mode in ("PA", "LA", "RGBA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")
