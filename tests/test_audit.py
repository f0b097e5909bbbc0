"""headstart audit: faults planted in a copy of the clothing set are found (precision and recall), a hostile folder
audits without a crash, training warns of leaks and honours an exclude list.

The planted-fault tests share one module-scoped copy of clothing (tests/plant.py, seed 0) and one audit of it."""

from __future__ import annotations

import json
import logging
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import headstart

from conftest import CLOTHING, HYMENOPTERA
from headstart.audit import (Audit, Finding, confident_learning, copy_similarity, exclude_lines, measure, nearest,
                             normalised)
from headstart.cli import main
from headstart.data import read_exclude, scan, without
from plant import near_copy, plant

ANT = HYMENOPTERA / "train/ants/1030023514_aad5c608f9.jpg"
BEE = HYMENOPTERA / "train/bees/1092977343_cb42b38d62.jpg"


def _thumb(path: Path) -> np.ndarray:
    import base64

    s = measure(path)
    return np.frombuffer(base64.b64decode(s["thumb"]), np.uint8).reshape(64, 64).astype(np.float32)


# ------------------------------------------------------------------------------------------ the pieces, quickly


def test_chunked_nearest_equals_the_dense_search(monkeypatch):
    import importlib

    a = importlib.import_module("headstart.audit")  # the module (headstart.audit is the function)
    rng = np.random.default_rng(0)
    x = normalised(rng.normal(size=(300, 16)).astype(np.float32))
    monkeypatch.setattr(a, "CHUNK_CELLS", 1000)  # 3 rows per block: many blocks
    idx, sim = nearest(x, x, 4, same=True)
    dense = x @ x.T
    np.fill_diagonal(dense, -np.inf)
    want = np.argsort(-dense, axis=1)[:, :4]
    assert (idx == want).all() and np.allclose(sim, np.take_along_axis(dense, want, axis=1), atol=1e-6)


def test_confident_learning_ranks_flipped_labels_first():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 4, 400)
    p = np.full((400, 4), 0.05)
    p[np.arange(400), y_true] = 0.85
    y = y_true.copy()
    flipped = rng.choice(400, 20, replace=False)
    y[flipped] = (y[flipped] + 1) % 4
    order = confident_learning(p, y)
    assert set(order[:20]) == set(flipped)


def test_copy_similarity_tells_a_copy_from_another_photo(tmp_path):
    copy = tmp_path / "copy.jpg"
    copy.write_bytes(near_copy(Image.open(ANT).convert("RGB"), random.Random(1)))
    a, c, other = _thumb(ANT), _thumb(copy), _thumb(HYMENOPTERA / "train/ants/1095476100_3906d8afde.jpg")
    assert copy_similarity(a, a) > 0.999
    assert copy_similarity(a, c) > headstart.config.AUDIT_NEAR
    assert copy_similarity(a, other) < 0.6


def test_exclude_list_is_read_with_comments_and_leaves_photos_out(tmp_path):
    ds = scan(HYMENOPTERA)
    listed = tmp_path / "exclude.txt"
    listed.write_text("# a comment\ntrain/ants/imageNotFound.gif  # placeholder: ...\n# train/bees/x.jpg  # mislabel?\n"
                      "train/ants/no-such-photo.jpg\n\n")
    paths = read_exclude(listed, ds.root)
    assert len(paths) == 2
    smaller, n = without(ds, paths)
    assert n == 1 and len(smaller.splits["train"]) == len(ds.splits["train"]) - 1
    assert headstart.TrainConfig(exclude=listed).exclude == str(listed)


def test_exclude_txt_suggests_safe_exclusions_and_leaves_judgement_to_a_person(tmp_path):
    findings = [Finding("leak", "val photo with an exact copy in train", ["val/a/x.jpg", "train/a/y.jpg"], 1.0, ["val", "train"], ["a", "a"]),
                Finding("mislabel", "confident learning", ["train/a/z.jpg"], 0.9, ["train"], ["a"], {"suggested": "b", "p_suggested": 0.9}),
                Finding("placeholder", "near-uniform", ["train/b/blank.png"], None, ["train"], ["b"]),
                Finding("placeholder", "near-uniform", ["val/b/blank.png"], None, ["val"], ["b"])]
    lines = exclude_lines(Audit(tmp_path, ["a", "b"], 0.77, findings, {}))
    active = [ln.split("  #")[0] for ln in lines if ln and not ln.startswith("#")]
    assert active == ["train/a/y.jpg", "train/b/blank.png"]  # the leak's train copy; a placeholder in train
    assert any(ln.startswith("# train/a/z.jpg") and "suggested: b" in ln for ln in lines)
    assert any(ln.startswith("# val/b/blank.png") for ln in lines)  # never a validation photo by default


# -------------------------------------------------------------------------------------- planted faults (slow)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("planted") / "clothing"
    truth = plant(CLOTHING, HYMENOPTERA, folder, seed=0)
    out = folder.parent / "audit"
    return truth, headstart.audit(folder, out), out


def _leak_pairs(a: Audit, exact: bool) -> set[tuple[str, str]]:
    return {(f.paths[0], f.paths[1]) for f in a.of("leak") if f.info["how"].startswith("exact") == exact}


@pytest.mark.slow
def test_exact_copies_across_splits_are_all_found_and_nothing_else(planted):
    truth, a, _ = planted
    found = _leak_pairs(a, exact=True)
    assert found == truth.exact  # precision = recall = 1.0
    assert not a.of("exact-duplicate")  # clothing itself has none


@pytest.mark.slow
def test_near_copies_across_splits_recall_95_at_precision_90(planted):
    truth, a, _ = planted
    found = _leak_pairs(a, exact=False)
    hits = len(found & truth.near)
    assert hits / len(truth.near) >= 0.95 and hits / max(len(found), 1) >= 0.9, (hits, len(found))


@pytest.mark.slow
def test_moved_labels_rank_high_among_likely_mislabels(planted):
    truth, a, _ = planted
    ranking = [f.paths[0] for f in a.of("mislabel")]
    top = set(ranking[:2 * len(truth.moved)])
    assert len(top & truth.moved) >= 0.7 * len(truth.moved), len(top & truth.moved)
    first = a.of("mislabel")[0]
    assert first.info["suggested"] in a.classes and 0 < first.info["p_suggested"] <= 1


@pytest.mark.slow
def test_off_topic_photos_are_outliers_or_mislabels(planted):
    truth, a, _ = planted
    flagged = {p for f in a.findings if f.kind in ("outlier", "mislabel") for p in f.paths}
    assert len(flagged & truth.offtopic) >= 8


@pytest.mark.slow
def test_placeholder_dark_and_blank_images_are_all_flagged(planted):
    truth, a, _ = planted
    flagged = {p for f in a.findings if f.kind in ("placeholder", "quality") for p in f.paths}
    assert truth.junk <= flagged


@pytest.mark.slow
def test_audit_files_json_html_and_exclude_list(planted):
    truth, a, out = planted
    data = json.loads((out / "audit.json").read_text())
    assert data["summary"] == a.summary() and all({"kind", "rule", "paths", "score"} <= set(f) for f in data["findings"])
    html = (out / "audit.html").read_text()
    assert "data:image/jpeg;base64," in html and "<script" not in html and "http://" not in html and "https://" not in html
    assert "suggested:" in html and "Leaks across splits" in html
    active = {ln.split("  #")[0] for ln in (out / "exclude.txt").read_text().splitlines() if ln and not ln.startswith("#")}
    assert {src for _, src in truth.exact} <= active  # the train copy of each leaked photo
    assert not any(p.startswith(("validation/", "test/")) for p in active)


@pytest.mark.slow
def test_the_k_means_trees_find_the_same_planted_faults(planted, monkeypatch):
    """The search a folder of over EXACT_UP_TO photos gets, on the planted folder (its cache is warm)."""
    import importlib

    truth, exact, _ = planted
    monkeypatch.setattr(importlib.import_module("headstart.audit"), "EXACT_UP_TO", 0)
    a = headstart.audit(exact.root)
    assert _leak_pairs(a, exact=True) == _leak_pairs(exact, exact=True) == truth.exact
    assert _leak_pairs(a, exact=False) == _leak_pairs(exact, exact=False)
    assert {tuple(f.paths) for f in a.of("near-duplicate")} == {tuple(f.paths) for f in exact.of("near-duplicate")}
    flagged = {p for f in a.findings if f.kind in ("outlier", "mislabel") for p in f.paths}
    assert len(flagged & truth.offtopic) >= 8


@pytest.mark.slow
def test_a_warm_audit_of_clothing_reads_the_cache_and_finds_no_duplicates(planted):
    a = headstart.audit(CLOTHING)  # the planted copy's untouched photos have the same bytes: everything is cached
    assert not a.of("exact-duplicate") and not [f for f in a.of("leak") if f.info["how"].startswith("exact")]
    assert a.timing["total_s"] < 30  # on a quiet machine about 2 s (BENCHMARKS.md)


# ----------------------------------------------------------------------------------------- real and hostile folders


@pytest.mark.slow
def test_ants_and_bees_image_not_found_is_flagged():
    a = headstart.audit(HYMENOPTERA)
    kinds = {f.kind for f in a.findings if "train/ants/imageNotFound.gif" in f.paths}
    assert kinds >= {"quality", "outlier"}, kinds  # mostly one colour, and far from ants and bees


@pytest.mark.slow
def test_hostile_folder_audits_and_each_unreadable_file_is_a_finding(tmp_path):
    from test_badinput import write_corpus

    made = write_corpus([(tmp_path / "data" / "ants", ANT), (tmp_path / "data" / "bees", BEE)])
    for cls in ("ants", "bees"):  # a few good photos per class, so there is something to compare
        for p in sorted((HYMENOPTERA / "train" / cls).glob("*.jpg"))[:6]:
            shutil.copyfile(p, tmp_path / "data" / cls / p.name)
    a = headstart.audit(tmp_path / "data", tmp_path / "out")
    unreadable = {p for f in a.of("unreadable") for p in f.paths}
    for case, files in made:
        if case.outcome == "skipped" and case.name != "unreadable file (chmod 000)":
            assert all(str(f.relative_to(tmp_path / "data")) in unreadable for f in files), case.name
    assert (tmp_path / "out" / "audit.html").is_file()


def _small_folder(root: Path, n: int = 10) -> Path:
    """ants/bees, n training photos per class and 4 validation photos, two of them copies of train photos."""
    for cls in ("ants", "bees"):
        photos = sorted((HYMENOPTERA / "train" / cls).glob("*.jpg"))[:n]
        for p in photos:
            (root / "train" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, root / "train" / cls / p.name)
        for p in sorted((HYMENOPTERA / "val" / cls).glob("*.jpg"))[:4]:
            (root / "val" / cls).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, root / "val" / cls / p.name)
    shutil.copyfile(root / "train/ants" / sorted(p.name for p in (root / "train/ants").iterdir())[0], root / "val/ants/copy.jpg")
    src = sorted((root / "train/bees").iterdir())[1]
    (root / "val/bees/near.jpg").write_bytes(near_copy(Image.open(src).convert("RGB"), random.Random(3)))
    return root


@pytest.mark.slow
def test_training_warns_of_leaks_and_the_report_says_so(tmp_path, caplog):
    data = _small_folder(tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="headstart"):
        headstart.train(data, out=tmp_path / "run", head="linear", progress=False)
    assert any("2 of 10 val photos have a copy in train" in r.getMessage() for r in caplog.records), caplog.text
    info = json.loads((tmp_path / "run" / "config.json").read_text())
    assert {p["how"] for p in info["leaks"]["pairs"]} == {"exact-bytes", "near"}
    assert "Leak across splits" in (tmp_path / "run" / "report.html").read_text()
    with pytest.MonkeyPatch.context() as mp:  # the same photos again: the pairs' similarities are read back, none compared
        mp.setattr(sys.modules["headstart.audit"], "copy_similarity", lambda *a: pytest.fail("a pair was compared again"))
        again = headstart.train(data, out=tmp_path / "again", head="linear", progress=False)
    assert again.info["leaks"] == info["leaks"]
    # the run folder audits the same photos, and its exclude list trains without the leaked copies
    r = CliRunner().invoke(main, ["audit", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["summary"]["leak"] == 2
    (tmp_path / "leaderboard.json").write_text(json.dumps({"rows": [{"run": "run", "status": "ok"}]}))  # a comparison folder
    assert headstart.audit(tmp_path).summary()["leak"] == 2
    exclude = tmp_path / "run" / "exclude.txt"
    clf = headstart.train(data, out=tmp_path / "run2", head="linear", exclude=exclude, progress=False)
    assert sum(clf.info["data"]["used"]["train"].values()) == 18 and clf.info["leaks"]["warning"] is None


def test_cli_refuses_a_near_threshold_out_of_range_before_any_work(tmp_path):
    r = CliRunner().invoke(main, ["audit", str(HYMENOPTERA), "--near", "1.5", "--out", str(tmp_path / "a")])
    assert r.exit_code == 2 and "near=1.5 is out of range" in r.output, r.output
    assert not (tmp_path / "a").exists()


def test_k_means_trees_find_nearly_every_nearest_neighbour(monkeypatch):
    """Above EXACT_UP_TO photos the search is approximate: it must still find the close pairs copies are. Small
    leaves and branching make the trees several levels deep, as a large folder's are."""
    import importlib

    a = importlib.import_module("headstart.audit")
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(40, 64))
    x = normalised((centres[rng.integers(0, 40, 4000)] + rng.normal(scale=0.8, size=(4000, 64))).astype(np.float32))
    exact_idx, exact_sim = a.nearest_exact(x, x, 3, same=True)
    monkeypatch.setattr(a, "EXACT_UP_TO", 1000)
    monkeypatch.setattr(a, "BRANCH", 4)
    monkeypatch.setattr(a, "LEAF", 32)
    tree = a.build_tree(x)
    assert len(tree.centres) >= 4 and max(map(len, tree.leaves)) <= 32
    assert (np.sort(np.concatenate(tree.leaves)) == np.arange(4000)).all()  # every row in one leaf
    idx, sim = a.nearest(x, x, 3, same=True)
    assert (idx[:, 0] == exact_idx[:, 0]).mean() >= 0.95
    assert (sim <= exact_sim + 1e-5).all() and (idx != np.arange(4000)[:, None]).all()
    assert all(len(set(row)) == 3 for row in idx.tolist())  # found by both trees, or both ways: listed once
    labels = rng.integers(0, 5, 4000)
    approx = a.class_affinity(x, labels, 5)
    monkeypatch.setattr(a, "EXACT_UP_TO", 10_000)
    assert np.corrcoef(approx, a.class_affinity(x, labels, 5))[0, 1] > 0.9


def test_a_tree_of_one_repeated_point_still_has_small_leaves(monkeypatch):
    import importlib

    a = importlib.import_module("headstart.audit")
    monkeypatch.setattr(a, "LEAF", 16)
    x = normalised(np.ones((500, 8), np.float32))
    tree = a.build_tree(x)
    assert max(map(len, tree.leaves)) <= 16 and sum(map(len, tree.leaves)) == 500
    idx, sim = a.nearest_in_tree(x, x, 2, same=True)
    assert (idx >= 0).all() and np.allclose(sim, 1.0)


def test_the_leak_warning_says_what_each_kind_of_copy_means():
    from headstart.audit import leak_warning

    def summary(same: int, conflict: int) -> dict:
        return {"val": {"n": 15, "leaked": same + conflict, "same_label": same, "conflict": conflict, "points": 100 * same / 15}}

    assert leak_warning(summary(0, 0)) is None
    only_conflict = leak_warning(summary(0, 1))
    assert "one of the two labels is wrong" in only_conflict and "inflates" not in only_conflict
    both = leak_warning(summary(2, 1))
    assert "inflates the score" in both and "one of the two labels is wrong" in both and "worth up to 13.3 points" in both


def test_an_audit_sees_photos_at_the_size_and_crop_its_run_chose(tmp_path):
    """A run folder is audited with the run's settings, so its cached features answer: where the run's
    cross-validation chose the size or crop ("auto"), the audit takes the chosen ones; a data folder audited with
    "auto" sees them as timm does instead of failing on the word."""
    from headstart.audit import resolve

    data = _small_folder(tmp_path / "data", n=6)
    clf = headstart.train(data, out=tmp_path / "run", input_size="auto", crop_pct="auto", progress=False)
    _, cfg = resolve(tmp_path / "run", None, {})
    assert (cfg.input_size, cfg.crop_pct) == (clf.backbone.data_config["input_size"][-1], clf.backbone.data_config["crop_pct"])
    assert headstart.audit(tmp_path / "run").timing["embeddings_s"] >= 0
    a = headstart.audit(data, input_size="auto", crop_pct="auto")
    assert len(a.findings) >= 1  # the copy and the near copy planted in val
