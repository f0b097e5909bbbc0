"""The demo data set: the CC0 "clothing dataset small" subset (10 classes, 1 439 photos).

Found through the shared-assets setting (``$HEADSTART_SHARED/datasets/clothing``), else downloaded from its public
GitHub repository; every file is checked against the sha256 manifest shipped with headstart.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from importlib import resources
from pathlib import Path

from . import config
from .data import HeadstartError
from .files import atomic_write_bytes

log = logging.getLogger("headstart")

REPO = "alexeygrigorev/clothing-dataset-small"
ARCHIVES = [f"https://github.com/{REPO}/archive/refs/heads/{b}.zip" for b in ("master", "main")]


def manifest() -> dict[str, str]:
    """relative path → sha256 for every demo file."""
    text = resources.files("headstart").joinpath("demo_clothing.sha256").read_text()
    return {line[66:]: line[:64] for line in text.splitlines() if line.strip()}


def demo_data(download_to: str | os.PathLike | None = None) -> Path:
    """The demo folder: the shared copy when present, else a verified download (cached after the first time)."""
    shared = config.shared_dir() / "datasets" / "clothing"
    if (shared / "train").is_dir():
        return shared
    target = Path(download_to) if download_to else config.cache_dir() / "demo" / "clothing"
    if (target / ".verified").is_file():
        return target
    return download(target)


def download(target: Path) -> Path:
    files = manifest()
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "data.zip"
        last = None
        for url in ARCHIVES:
            try:
                log.info("downloading the demo data from %s", url)
                with urllib.request.urlopen(url, timeout=30) as r, open(archive, "wb") as f:
                    shutil.copyfileobj(r, f)
                break
            except (urllib.error.URLError, OSError) as e:
                last = e
        else:
            raise HeadstartError(
                f"no demo data: '{config.shared_dir() / 'datasets' / 'clothing'}' does not exist and the download from "
                f"github.com/{REPO} failed ({last}). Offline? Set HEADSTART_SHARED to a folder holding datasets/clothing, "
                "or train on your own photos: headstart train FOLDER"
            )
        with zipfile.ZipFile(archive) as z:
            names = {n.split("/", 1)[1]: n for n in z.namelist() if "/" in n}
            bad = []
            for rel, digest in files.items():
                if rel not in names:
                    bad.append(f"{rel} (missing)")
                    continue
                data = z.read(names[rel])
                if hashlib.sha256(data).hexdigest() != digest:
                    bad.append(f"{rel} (checksum mismatch)")
                    continue
                atomic_write_bytes(target / rel, data)
    if bad:
        raise HeadstartError(f"the downloaded demo data does not match its manifest: {', '.join(bad[:5])} and {max(0, len(bad) - 5)} more")
    (target / ".verified").write_text("ok\n")
    log.info("demo data verified: %d files in %s", len(files), target)
    return target
