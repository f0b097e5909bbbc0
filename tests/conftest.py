"""Shared fixtures: the real assets (via HEADSTART_SHARED), a fresh feature cache per test session,
and one trained ants-vs-bees run that several test modules inspect."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import headstart
from headstart.config import shared_dir

SHARED = shared_dir()
HYMENOPTERA = SHARED / "datasets" / "hymenoptera"
CLOTHING = SHARED / "datasets" / "clothing"
WEIGHTS = SHARED / "weights"

if not HYMENOPTERA.is_dir():
    raise RuntimeError(f"the shared assets are missing at {SHARED}: set HEADSTART_SHARED to their folder")


@pytest.fixture(scope="session", autouse=True)
def _fresh_cache(tmp_path_factory: pytest.TempPathFactory):
    """Every test session starts with an empty feature cache, so cache behaviour is really exercised, and an empty
    weights folder, so a developer's $HEADSTART_WEIGHTS cannot change which backbones have weights."""
    old = {k: os.environ.get(k) for k in ("HEADSTART_CACHE", "HEADSTART_WEIGHTS")}
    os.environ["HEADSTART_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    os.environ["HEADSTART_WEIGHTS"] = str(tmp_path_factory.mktemp("weights"))  # empty: a test says where weights are
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ants_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[headstart.Classifier, Path]:
    out = tmp_path_factory.mktemp("runs") / "ants"
    clf = headstart.train(HYMENOPTERA, out=out, progress=False)
    return clf, out


CHROMIUM = Path("/usr/bin/chromium")  # Debian's; `make test` installs it (Playwright's own download is not used)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium for the tests that look at a page as a person does: a failure under CI when missing
    (`make test` installs it), a skip elsewhere."""
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
        pytest.skip(f"no {CHROMIUM} here (apt-get install chromium); CI installs it and runs this test")
    if os.environ.get("CI"):
        from playwright.sync_api import sync_playwright
    else:
        sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def ants_bees(root: Path, per_split: dict[str, int]) -> Path:
    """A small real ants/bees folder: the first N photos of each class per split, as symlinks (nothing copied)."""
    for split, n in per_split.items():
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True)
            for p in sorted((HYMENOPTERA / split / cls).glob("*.jpg"))[:n]:
                (root / split / cls / p.name).symlink_to(p)
    return root


def save_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (64, 48), color=(200, 30, 30), fmt: str | None = None, **kw) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if mode in ("L", "P"):
        img = Image.new("RGB", size, color).convert(mode)
    elif mode == "I;16":
        import numpy as np

        img = Image.fromarray((np.linspace(0, 65535, size[0] * size[1]).reshape(size[1], size[0])).astype("uint16"))
    else:
        img = Image.new(mode, size, color if mode != "RGBA" else (*color, 128))
    img.save(path, format=fmt, **kw)
    return path
