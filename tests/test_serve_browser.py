"""The serve page as a person uses it, in headless Chromium: a val photo dropped in (the file input), the bars and
the Grad-CAM picture waited for, the shown answer checked against the run's own; then a click on a confusion
matrix cell. Reading the HTML cannot tell whether the script really draws them."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Iterator

import pytest

import test_serve
from test_serve import EVIL_FILE, SCRIPT

script_compare = test_serve.script_compare  # the fixture (a comparison with a class named <script>…), shared with the HTTP tests




@pytest.fixture(scope="module")
def url(ants_run) -> Iterator[str]:
    yield from test_serve.start(ants_run[1])


def right_and_wrong(run: Path) -> tuple[dict[str, str], dict[str, str]]:
    """A val photo the run gets right, and one it gets wrong (from its predictions.csv)."""
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return next(r for r in rows if r["true"] == r["predicted"] == "bees"), next(r for r in rows if r["true"] != r["predicted"])


def test_drop_a_photo_and_see_bars_and_gradcam(browser, url, ants_run, tmp_path):
    right, wrong = right_and_wrong(ants_run[1])
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    failed: list[str] = []
    page.on("requestfailed", lambda r: failed.append(r.url))
    page.on("pageerror", lambda e: failed.append(str(e)))
    page.on("response", lambda r: r.status >= 400 and failed.append(f"{r.status} {r.url}"))
    try:
        page.goto(url)
        page.set_input_files("#file", right["path"])
        page.wait_for_selector(".result .bar", timeout=60_000)
        shown = page.inner_text(".result .bar .label")
        page.wait_for_function("() => { const i = document.querySelector('.result img.cam');"
                               " return i && i.complete && i.naturalWidth > 0; }", timeout=120_000)
        cam_width = page.evaluate("() => document.querySelector('.result img.cam').naturalWidth")
        page.wait_for_selector("#gallery figure img", timeout=30_000)
        page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        # a click on the off-diagonal cell of the wrong photo's classes lists it
        page.click(f"#confusion td[data-true='{wrong['true']}'][data-predicted='{wrong['predicted']}']")
        names = page.eval_on_selector_all("#gallery figure", "fs => fs.map(f => f.title)")
        loaded = page.eval_on_selector_all("#gallery img", "is => is.map(i => i.complete && i.naturalWidth > 0)")
        page.click("#gallery figure img")  # a gallery photo's Grad-CAM, in its place
        page.wait_for_function("() => { const i = document.querySelector('#gallery figure img');"
                               " return i.src.includes('/api/gradcam') && i.complete && i.naturalWidth > 0; }", timeout=60_000)
        page.screenshot(path=str(tmp_path / "serve-cell.png"), full_page=True)
    finally:
        page.close()
    assert shown == right["true"] == "bees"
    assert cam_width > 0
    assert Path(wrong["path"]).name in names
    assert loaded and all(loaded)
    assert not failed, f"requests failed or the script threw: {failed}"
    assert (tmp_path / "serve.png").stat().st_size > 10_000


@pytest.fixture(scope="module")
def script_url(script_compare) -> Iterator[str]:
    yield from test_serve.start(script_compare)


def test_a_class_named_script_shows_as_text_and_runs_nothing(browser, script_url, tmp_path):
    """A class folder named ``<script>alert(1)`` and a photo named ``<img src=x onerror=…>``: shown as their names
    in the matrix and the audit, the photo shown too, and no script of theirs ever runs (an alert opens a dialog)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto(script_url)
        page.wait_for_selector("#confusion th + th", timeout=30_000)
        page.wait_for_selector("#audit .finding", timeout=30_000)
        headings = page.eval_on_selector_all("#confusion tr:first-child th", "ths => ths.map(t => t.textContent)")
        audit = page.inner_text("#audit")
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function("() => [...document.querySelectorAll('#audit img')].every(i => i.complete && i.naturalWidth > 0)",
                               timeout=30_000)
        shown = page.eval_on_selector_all("#audit img", "is => is.map(i => i.naturalWidth > 0)")
        board = page.inner_text("#board")
        page.screenshot(path=str(tmp_path / "script.png"), full_page=True)
    finally:
        page.close()
    assert SCRIPT in headings and SCRIPT in audit and EVIL_FILE in audit and "efficientnet_lite0" in board
    assert all(shown) and len(shown) == 2  # both audit photos, the oddly named one included, decoded
    assert not dialogs
