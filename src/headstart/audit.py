"""``audit()``: what is wrong with a folder of labelled photos, found before it costs accuracy.

    photos → embeddings (the feature cache) → per-photo statistics (cached by content) → findings → files

Every finding names its photos (relative to the data folder), a score and the rule that fired:

* ``unreadable``: a file that cannot be decoded (or is not an image at all);
* ``exact-duplicate``: the same bytes, or the same decoded pixels (a re-saved copy), twice in one split;
* ``near-duplicate``: cosine similarity of the L2-normalised embeddings at or above ``near``, within a split;
* ``leak``: a validation or test photo whose exact or near copy is in train, with the same label (it inflates
  the score) or another one (a conflict: one of the two labels is wrong);
* ``mislabel``: confident learning on out-of-fold probabilities of a linear head (``heads.out_of_fold``);
* ``outlier``: far from every class (mean similarity to its nearest photos in each class, robust threshold);
* ``quality``: near-uniform or placeholder, very dark or bright, blurry, tiny, extreme aspect ratio, grayscale in
  a colour set; and ``imbalance`` of the training classes.

The neighbour search is exact up to ``EXACT_UP_TO`` photos (every pair, a block of rows at a time: ``CHUNK_CELLS``
similarities at most) and above uses k-means trees searched with a beam (n log n time); either way memory grows
with the number of photos, never with its square.
``leaks`` is the cheap part that ``pipeline.train`` runs on the embeddings it already computed. Nothing is ever
deleted or moved: the audit writes ``audit.json``, ``audit.html`` and an editable ``exclude.txt``
(``headstart train --exclude``).
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import functools
import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

from . import backbones, cache, features, heads
from .config import AUDIT_NEAR, HeadstartError, TrainConfig
from .data import Skipped, Split, open_rgb, scan, train_val_split
from .files import atomic_write_text
from .report import jpeg_thumbnail, picture, render_page

log = logging.getLogger("headstart")

NEAR = AUDIT_NEAR  # default copy similarity for a near duplicate: measured in BENCHMARKS.md ("Audit thresholds")
CANDIDATE = 0.75  # embedding cosine at or above which two photos are compared as possible copies (planted copies: ≥ 0.805)
COARSE = 0.45  # a pair whose best coarse crop correlates less is no copy (copies: ≥ 0.57 before refinement)
NEIGHBOURS = 3  # nearest photos per photo compared as possible copies
THUMB, DETAIL = 64, 32  # px: the grayscale thumbnail kept per photo; the detail grid two views are compared on
CLASS_K = 5  # nearest photos per class for the outlier score
SAME_PICTURE = 0.80  # embedding cosine from which a neighbour may be a copy: left out of the outlier score
CHUNK_CELLS = 1 << 23  # similarities held at once (32 MB of float32), whatever the number of photos
EXACT_UP_TO = 10_000  # photos searched exactly (every pair); above, k-means trees, faster from here (see below)
BRANCH, LEAF = 64, 128  # the k-means tree: most children per node, most rows per leaf
BEAM = 8  # tree nodes each query keeps per level (and leaves whose rows it scores)
TREES = 2  # trees searched (differently seeded): a close pair is missed only if each misses it
OFFERED = 8  # nearest rows each row is offered to as a neighbour (b near a is a near b)
# The trees' numbers, from tuning runs on photos like BENCHMARKS.md's ("Audit scaling"; recall@1 / near copies
# found): at 100 000 photos these give 0.997 / 1.000; a beam of 4, 0.986 / 0.999; leaves of 64, 0.993 / 1.000 in
# 1.5× the time. At 50 000 with leaves of 64: one tree with a beam of 16 (the work of two with 8) 0.988 / 0.996, two
# with 8 0.998 / 1.000, and with branching 32 0.994 / 0.999. Exact and trees take the same CPU time at 10 000
# photos; at 20 000 the trees take half.
FIT, KMEANS_ROUNDS = 32, 6  # k-means of a tree node: sample rows per centre, rounds
WIDE = 64  # nearest photos the outlier score reads above EXACT_UP_TO
OUTLIER_Z = 3.5  # robust z-score (median and MAD) above which a photo is far from every class
THUMBS = 60  # findings per kind shown with pictures in audit.html (the rest as text)
STATS = "audit/stats-2"  # the per-photo statistics store (bump the suffix when `measure` changes)
PAIRS = "audit/pairs-1"  # training's leak check: the copy similarity of its candidate pairs, by content (bump the
# suffix when `copy_similarity` changes), so a re-run on the same photos compares none again
EXCLUDED_BY_DEFAULT = {"leak", "exact-duplicate", "unreadable", "placeholder"}


@dataclass
class Photos:
    """Every photo the audit looks at, in one list: its split (as training would draw it) and label."""

    root: Path
    classes: list[str]
    paths: list[Path]
    split: list[str]
    labels: np.ndarray
    skipped: list[Skipped] = field(default_factory=list)

    def rel(self, i: int) -> str:
        try:
            return str(self.paths[i].relative_to(self.root))
        except ValueError:
            return str(self.paths[i])

    def label(self, i: int) -> str:
        return self.classes[int(self.labels[i])]


@dataclass
class Finding:
    """One problem: its kind, the rule that fired (in words, with its numbers), the photos and a score."""

    kind: str
    rule: str
    paths: list[str]
    score: float | None = None
    splits: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # leak: how/same_label; mislabel: suggested, p_suggested, p_given

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Audit:
    """The audit's result: every finding, counts, the settings it ran with and where it wrote its files."""

    root: Path
    classes: list[str]
    near: float
    findings: list[Finding]
    counts: dict[str, dict[str, int]]
    timing: dict[str, float] = field(default_factory=dict)
    out: Path | None = None

    def of(self, kind: str) -> list[Finding]:
        return [f for f in self.findings if f.kind == kind]

    def summary(self) -> dict[str, int]:
        return {k: len(self.of(k)) for k in dict.fromkeys(f.kind for f in self.findings)}

    def to_dict(self) -> dict[str, Any]:
        return {"data": str(self.root), "classes": self.classes, "near": self.near, "counts": self.counts,
                "summary": self.summary(), "timing": self.timing, "findings": [f.to_dict() for f in self.findings]}


# ------------------------------------------------------------------------------------------------- audit


def audit(data: str | Path, out: str | Path | None = None, *, near: float = NEAR, config: TrainConfig | None = None,
          progress: bool = False, **overrides: Any) -> Audit:
    """Audit the photos of ``data``: a data folder, a run folder (``headstart train``) or a comparison folder
    (``headstart compare``), whose recorded settings are used so the feature cache answers. With ``out``, writes
    ``audit.json``, ``audit.html`` and ``exclude.txt`` there."""
    if not 0 < near <= 1:
        raise HeadstartError(f"near={near} is out of range: give a copy similarity above 0 and at most 1 (1 = the same "
                             f"picture; default {NEAR})")
    t0 = time.perf_counter()
    root, cfg = resolve(data, config, overrides)
    ph = photos(root, cfg)
    f = embeddings(ph, cfg, progress)
    stats = measure_all(ph.paths, f.digests, cfg)
    t1 = time.perf_counter()
    findings = [*unreadable(ph, f, stats), *exact_duplicates(ph, f.digests, stats)]
    findings += similarity_findings(ph, f, near, cfg, findings, stats)
    findings += quality(ph, stats) + imbalance(ph)
    result = Audit(ph.root, ph.classes, near, findings, _counts(ph),
                   {"embeddings_s": round(f.seconds, 3), "statistics_s": round(t1 - t0 - f.seconds, 3),
                    "findings_s": round(time.perf_counter() - t1, 3)})
    if out is not None:
        write(result, Path(out), ph)
    result.timing["total_s"] = round(time.perf_counter() - t0, 3)
    log.info("audit: %s in %.1f s", ", ".join(f"{n} {k}" for k, n in result.summary().items()) or "nothing found",
             result.timing["total_s"])
    return result


def resolve(data: str | Path, config: TrainConfig | None, overrides: dict[str, Any]) -> tuple[Path, TrainConfig]:
    """The data folder and settings: a run folder's own (its config.json), the best run of a comparison folder,
    or the given ones for a data folder."""
    folder = Path(data)
    run = _run_of(folder)
    if run is None:
        cfg = dataclasses.replace(config, **overrides) if config is not None else TrainConfig(**overrides)
        return folder, cfg
    info = json.loads((run / "config.json").read_text())
    saved = TrainConfig.from_dict(info.get("train_config", {}))
    keep = {"cache_dir": config.cache_dir} if config is not None and config.cache_dir else {}
    root = Path(info.get("data", {}).get("root", ""))
    if not root.is_dir():
        raise HeadstartError(f"the photos of run '{run}' are no longer at '{root}': audit the data folder itself")
    log.info("audit: the photos of run %s (%s), with its settings", run, root)
    pre = info.get("preprocess", {})  # what the run's own cross-validation chose, where it chose (crop or size "auto")
    chosen = {"input_size": pre["input_size"][-1]} if saved.size_search and pre.get("input_size") else {}
    chosen |= {"crop_pct": pre["crop_pct"]} if saved.crop_pct == "auto" and pre.get("crop_pct") else {}
    return root, dataclasses.replace(saved, **keep, **chosen, **overrides)


def is_run_folder(folder: Path) -> bool:
    """A run folder (``headstart train``) or a comparison folder (``headstart compare``), not a data folder."""
    return (Path(folder) / "config.json").is_file() or (Path(folder) / "leaderboard.json").is_file()


def _run_of(folder: Path) -> Path | None:
    """The run folder whose photos ``folder`` stands for (itself, or a comparison's first finished run)."""
    if (folder / "config.json").is_file():
        return folder
    board = folder / "leaderboard.json"
    if not board.is_file():
        return None
    rows = json.loads(board.read_text()).get("rows", [])
    runs = [folder / r["run"] for r in rows if r.get("run") and (folder / r["run"] / "config.json").is_file()]
    if not runs:
        raise HeadstartError(f"'{folder}' is a comparison folder without a finished run: audit the data folder itself")
    return runs[0]


def photos(root: Path, cfg: TrainConfig) -> Photos:
    """Every photo of the folder with the split training would use (the folder's own, or the same seeded draw)."""
    ds = scan(root)
    tr, va, te = train_val_split(ds, cfg.val_fraction, cfg.seed)
    parts = [("train", tr), ("val", va)] + ([("test", te)] if te is not None else [])
    paths = [p for _, s in parts for p in s.paths]
    return Photos(ds.root, ds.classes, paths, [n for n, s in parts for _ in s.paths],
                  np.array([y for _, s in parts for y in s.labels], dtype=int), list(ds.skipped))


def embeddings(ph: Photos, cfg: TrainConfig, progress: bool) -> features.Features:
    """The backbone's embeddings of every photo, read from the feature cache where training left them."""
    crop = None if cfg.crop_pct == "auto" else cfg.crop_pct  # "auto" is a training run's choice: the audit sees as timm does
    size = None if cfg.input_size == "auto" else cfg.input_size
    lb = backbones.load_for_training(cfg.backbone, cfg.weights, seed=cfg.seed, cache_dir=cfg.cache_dir,
                                     input_size=size, crop_pct=crop)
    if not lb.spec.pretrained:
        raise HeadstartError(f"backbone '{cfg.backbone}' has no pretrained weights: the audit compares photos by "
                             "what a pretrained network sees; give one (e.g. efficientnet_lite0)")
    return features.extract(ph.paths, lb, cache_dir=cfg.cache_dir, batch_size=cfg.batch_size, precision=cfg.precision,
                            runtime=cfg.runtime, workers=cfg.workers, progress=progress, root=ph.root)


# ---------------------------------------------------------------------------------------- photo statistics


def measure(path: Path) -> dict[str, Any]:
    """One decode of the photo: its size, a hash of its pixels, and the image statistics the quality rules read
    (on a copy at most 256 px wide, so a large photo costs no more than a small one)."""
    try:
        return _statistics(open_rgb(path))
    except ValueError as e:
        return {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop the audit
        return {"error": f"cannot decode ({type(e).__name__}: {e})"}


def _statistics(img: Image.Image) -> dict[str, Any]:
    a = np.asarray(img)
    pixels = hashlib.sha256(f"{a.shape}".encode() + a.tobytes()).hexdigest()
    thumb = np.asarray(img.convert("L").resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8)
    img.thumbnail((256, 256))
    s = np.asarray(img, dtype=np.float32)
    gray = s @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = 4 * gray[1:-1, 1:-1] - gray[:-2, 1:-1] - gray[2:, 1:-1] - gray[1:-1, :-2] - gray[1:-1, 2:]
    packed = (np.asarray(img, dtype=np.uint32) * np.array([1 << 16, 1 << 8, 1], np.uint32)).sum(axis=2)
    _, counts = np.unique(packed, return_counts=True)
    return {"width": int(a.shape[1]), "height": int(a.shape[0]), "pixels": pixels, "mean": float(gray.mean()),
            "std": float(gray.std()), "sharpness": float(lap.var()) if lap.size else 0.0,
            "colours": int(len(counts)), "dominant": float(counts.max() / counts.sum()),
            "chroma": float((s.max(axis=2) - s.min(axis=2)).mean()), "thumb": base64.b64encode(thumb.tobytes()).decode()}


def measure_all(paths: Sequence[Path], digests: Sequence[str | None], cfg: TrainConfig) -> list[dict[str, Any]]:
    """``measure`` of every photo, remembered by content in ``<cache>/audit/``: a repeated audit decodes nothing."""
    store = cache.store(STATS, cfg.cache_dir, sharded=True)
    digests = [d or features.file_digest(Path(p)) for p, d in zip(paths, digests)] if digests else \
        [features.file_digest(Path(p)) for p in paths]

    def one(i: int) -> dict[str, Any]:
        d = digests[i]
        if d is None:
            return measure(Path(paths[i]))  # unreadable: says why, never cached
        known = store.read_json(d)
        if isinstance(known, dict):
            return known
        stats = measure(Path(paths[i])) | {"bytes": d}
        store.write_json(d, stats)
        return stats

    workers = max(1, features.default_workers() + 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="audit") as pool:  # Pillow and numpy release the GIL
        return list(pool.map(one, range(len(paths))))


# ------------------------------------------------------------------------------------- the neighbour search


def normalised(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def _blocks(n_rows: int, n_cols: int) -> Iterator[slice]:
    step = max(1, CHUNK_CELLS // max(n_cols, 1))
    for i in range(0, n_rows, step):
        yield slice(i, min(i + step, n_rows))


def nearest(q: np.ndarray, r: np.ndarray, k: int, same: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``q``, the ``k`` most similar rows of ``r`` (indices, cosine similarities; most similar
    first), both L2-normalised. ``same``: ``q`` is ``r``, and a row is not its own neighbour. Exact up to
    ``EXACT_UP_TO`` rows of ``r`` (every pair scored, n² time); above, k-means trees (``nearest_in_tree``:
    n log n time). Either way memory grows linearly: at most ``CHUNK_CELLS`` similarities exist at once."""
    if len(r) > EXACT_UP_TO:
        return nearest_in_tree(q, r, k, same)
    return nearest_exact(q, r, k, same)


def nearest_exact(q: np.ndarray, r: np.ndarray, k: int, same: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``nearest`` by scoring every pair, a block of rows at a time."""
    k = min(k, len(r) - (1 if same else 0))
    idx = np.zeros((len(q), max(k, 0)), dtype=np.int64)
    sim = np.zeros((len(q), max(k, 0)), dtype=np.float32)
    if k <= 0:
        return idx, sim
    for b in _blocks(len(q), len(r)):
        s = q[b] @ r.T
        if same:
            s[np.arange(s.shape[0]), np.arange(b.start, b.stop)] = -np.inf
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ts = np.take_along_axis(s, top, axis=1)
        order = np.argsort(-ts, axis=1)
        idx[b], sim[b] = np.take_along_axis(top, order, axis=1), np.take_along_axis(ts, order, axis=1)
    return idx, sim


@dataclass
class Tree:
    """A hierarchical spherical k-means tree over the rows of a matrix. Each level below the root holds, for each
    node, the k-means centre and offset that routed rows to it (a row goes to the child of highest ``row · centre
    - offset``) and its children on the next level; the last level's nodes are the leaves, each holding at most
    ``LEAF`` rows, every row in one leaf. A node small enough already is carried down unchanged (its one child is
    itself), so every leaf sits on the last level and the search moves level by level."""

    centres: list[np.ndarray]
    offsets: list[np.ndarray]
    children: list[list[np.ndarray]]
    leaves: list[np.ndarray]


def build_tree(r: np.ndarray, seed: int = 0) -> Tree:
    """Split every node of over ``LEAF`` rows into at most ``BRANCH`` by spherical k-means, level by level, until
    none is left: about log n / log ``BRANCH`` levels, each costing one pass over the rows (n log n in all)."""
    rng = np.random.default_rng(seed)
    groups = [np.arange(len(r))]
    tree = Tree([], [], [], groups)
    while any(len(g) > LEAF for g in groups):
        below: list[np.ndarray] = []
        centres, offsets, kids = [], [], []
        for g in groups:
            if len(g) > LEAF:
                parts, c, o = _split(r, g, rng)
            else:  # a leaf already: carried down as it is
                parts, c, o = [g], np.zeros((1, r.shape[1]), np.float32), np.zeros(1, np.float32)
            kids.append(np.arange(len(below), len(below) + len(parts)))
            below += parts
            centres.append(c)
            offsets.append(o)
        tree.centres.append(np.concatenate(centres))
        tree.offsets.append(np.concatenate(offsets))
        tree.children.append(kids)
        groups = below
    tree.leaves = groups
    return tree


def _split(r: np.ndarray, rows: np.ndarray, rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """``rows`` in up to ``BRANCH`` groups (with the centres and offsets that route a row to its group) by spherical
    k-means of the rows less their mean (so one group does not draw every row to it for what all rows share),
    fitted on a sample of at most ``FIT`` rows per group: a node costs one pass over its rows, whatever its size.
    Rows that are all one point go to equal slices."""
    b = min(BRANCH, -(-len(rows) // LEAF))
    sample = r[rng.choice(rows, min(len(rows), FIT * b), replace=False)]
    mu = sample.mean(axis=0)
    sample = normalised(sample - mu)
    c = sample[rng.choice(len(sample), b, replace=False)]
    for _ in range(KMEANS_ROUNDS):
        onehot = np.eye(b, dtype=np.float32)[(sample @ c.T).argmax(axis=1)]
        used = onehot.sum(axis=0) > 0
        c[used] = normalised((onehot.T @ sample)[used])
    offset = mu @ c.T
    assign = np.concatenate([(r[rows[s]] @ c.T - offset).argmax(axis=1) for s in _blocks(len(rows), b)])
    used = np.flatnonzero(np.bincount(assign, minlength=b))
    if len(used) < 2:
        return np.array_split(rows, b), np.zeros((b, r.shape[1]), np.float32), np.zeros(b, np.float32)
    return [rows[assign == j] for j in used], c[used], offset[used]


def nearest_in_tree(q: np.ndarray, r: np.ndarray, k: int, same: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``nearest`` through ``TREES`` k-means trees (``build_tree``, each seeded differently), each searched with a
    beam (``search_tree``): a row's ``k`` best of what the trees found and, with ``same``, of the rows that found
    it among their ``OFFERED`` nearest (b near a is a near b), so a close pair is missed only when every search
    misses it. Approximate: a place left empty holds index -1, similarity -inf."""
    k = min(k, len(r) - (1 if same else 0))
    if k <= 0:
        return np.zeros((len(q), 0), np.int64), np.zeros((len(q), 0), np.float32)
    found = [search_tree(build_tree(r, seed), q, r, k, same) for seed in range(TREES)]
    idx, sim = _combined(np.concatenate([i for i, _ in found], axis=1), np.concatenate([s for _, s in found], axis=1), k)
    if not same:
        return idx, sim
    offered = idx[:, :OFFERED]
    by, to, val = offered.ravel(), np.repeat(np.arange(len(q)), offered.shape[1]), sim[:, :OFFERED].ravel()
    order = np.argsort(by, kind="stable")
    return _combined(idx, sim, k, (by[order], to[order], val[order]))


def _combined(idx: np.ndarray, sim: np.ndarray, k: int,
              extra: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar distinct neighbours, best first, among its candidates in ``idx``/``sim`` (-1:
    none) and the ``extra`` (row, neighbour, similarity) triples (sorted by row); a block of rows at a time."""
    n = len(idx)
    out_idx, out_sim = np.full((n, k), -1, np.int64), np.full((n, k), -np.inf, np.float32)
    for b in _blocks(n, 8 * idx.shape[1]):
        src = np.repeat(np.arange(b.stop - b.start), idx.shape[1])
        dst, val = idx[b].ravel(), sim[b].ravel()
        if extra is not None:
            lo, hi = np.searchsorted(extra[0], [b.start, b.stop])
            src = np.concatenate([src, extra[0][lo:hi] - b.start])
            dst, val = np.concatenate([dst, extra[1][lo:hi]]), np.concatenate([val, extra[2][lo:hi]])
        ok = dst >= 0
        src, dst, val = src[ok], dst[ok], val[ok]
        order = np.lexsort((-val, dst, src))  # by row, then neighbour, best first
        src, dst, val = src[order], dst[order], val[order]
        first = np.ones(len(src), bool)
        first[1:] = (src[1:] != src[:-1]) | (dst[1:] != dst[:-1])  # a neighbour found twice counts once
        src, dst, val = src[first], dst[first], val[first]
        order = np.lexsort((-val, src))
        src, dst, val = src[order], dst[order], val[order]
        rank = np.arange(len(src)) - np.searchsorted(src, src)
        top = rank < k
        out_idx[b][src[top], rank[top]], out_sim[b][src[top], rank[top]] = dst[top], val[top]
    return out_idx, out_sim


def search_tree(tree: Tree, q: np.ndarray, r: np.ndarray, k: int, same: bool) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best rows of ``r`` (the rows ``tree`` was built on) for each query, by beam search: each query
    follows the tree's routing and keeps at each level the ``BEAM`` nodes it misses by the least (the sum, down the
    path, of how far each child's routing score fell short of the best sibling's: 0 on the path a row like it was
    sent down), then scores the rows of its ``BEAM`` leaves. A query costs about ``BEAM`` × ``BRANCH`` centres per
    level and ``BEAM`` × ``LEAF`` rows, so n queries cost n log n."""
    beam = np.zeros((len(q), 1), dtype=np.int64)  # every query at the root
    score = np.zeros((len(q), 1), dtype=np.float32)  # minus the shortfall so far: higher is better
    for centres, offsets, children in zip(tree.centres, tree.offsets, tree.children):
        # a node with one child (a leaf carried down) passes its place and score on as they are
        only = np.array([c[0] if len(c) == 1 else -1 for c in children])[np.maximum(beam, 0)]
        only[beam < 0] = -1
        nodes = np.full((len(q), BEAM), -1, dtype=np.int64)
        below = np.full((len(q), BEAM), -np.inf, dtype=np.float32)
        nodes[:, :beam.shape[1]] = only
        below[:, :beam.shape[1]] = np.where(only >= 0, score, -np.inf)
        for rows, slots, node in _by_node(np.where(only >= 0, -1, beam)):
            cols = children[node]
            s = q[rows] @ centres[cols].T - offsets[cols]
            _merge(nodes, below, rows, cols, score[rows, slots][:, None] + s - s.max(axis=1, keepdims=True), BEAM)
        beam, score = nodes, below
    idx = np.full((len(q), k), -1, dtype=np.int64)
    sim = np.full((len(q), k), -np.inf, dtype=np.float32)
    for rows, _, leaf in _by_node(beam):
        cols = tree.leaves[leaf]
        vecs = r[cols]
        for b in _blocks(len(rows), len(cols)):
            s = q[rows[b]] @ vecs.T
            if same:
                s[rows[b][:, None] == cols[None, :]] = -np.inf
            _merge(idx, sim, rows[b], cols, s, k)
    return idx, sim


def _by_node(beam: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(queries, their beam slots, node) for every node in some query's ``beam`` (-1: an empty slot): sorted once,
    so a level costs its (query, node) pairs, not nodes × queries."""
    who, slot = np.nonzero(beam >= 0)
    node = beam[who, slot]
    order = np.argsort(node, kind="stable")
    who, slot, node = who[order], slot[order], node[order]
    for run in np.split(np.arange(len(node)), np.flatnonzero(np.diff(node)) + 1) if len(node) else ():
        yield who[run], slot[run], int(node[run[0]])


def _merge(idx: np.ndarray, sim: np.ndarray, rows: np.ndarray, members: np.ndarray, s: np.ndarray, k: int) -> None:
    """Keep, for each of ``rows``, the ``k`` best of what it had and the new similarities ``s`` to ``members``."""
    cand_sim = np.concatenate([sim[rows], s], axis=1)
    cand_idx = np.concatenate([idx[rows], np.broadcast_to(members, s.shape)], axis=1)
    top = np.argpartition(-cand_sim, k - 1, axis=1)[:, :k]
    sim[rows], idx[rows] = np.take_along_axis(cand_sim, top, axis=1), np.take_along_axis(cand_idx, top, axis=1)


def class_affinity(x: np.ndarray, labels: np.ndarray, n_classes: int, k: int = CLASS_K) -> np.ndarray:
    """For each row, its highest mean similarity to its ``k`` nearest photos of one class, over all classes
    (itself and any photo that may be a copy of it, cosine ≥ ``SAME_PICTURE``, left out, so a copied stray still
    looks stray): low = far from every class. Above ``EXACT_UP_TO`` rows, read from each row's ``WIDE`` nearest
    photos (the k-means trees), a class absent from them counting as far."""
    if len(x) > EXACT_UP_TO:
        return _affinity_of_neighbours(x, labels, n_classes, k)
    best = np.full(len(x), -1.0, dtype=np.float32)
    members = [np.flatnonzero(labels == c) for c in range(n_classes)]
    for b in _blocks(len(x), len(x)):
        s = x[b] @ x.T
        s[np.arange(s.shape[0]), np.arange(b.start, b.stop)] = -1.0
        s[s >= SAME_PICTURE] = -1.0
        for cols in members:
            kk = min(k, len(cols))
            if kk:
                part = -np.partition(-s[:, cols], kk - 1, axis=1)[:, :kk]
                best[b] = np.maximum(best[b], part.mean(axis=1))
    return best


def _affinity_of_neighbours(x: np.ndarray, labels: np.ndarray, n_classes: int, k: int) -> np.ndarray:
    idx, sim = nearest(x, x, WIDE, same=True)
    sim = np.where((sim >= SAME_PICTURE) | (idx < 0), -1.0, sim)
    best = np.full(len(x), -1.0, dtype=np.float32)
    for c in range(n_classes):
        mine = np.where(labels[idx] == c, sim, -1.0)
        best = np.maximum(best, -np.partition(-mine, k - 1, axis=1)[:, :k].mean(axis=1))
    return best


# ------------------------------------------------------------------------------------------- the findings


def unreadable(ph: Photos, f: features.Features, stats: list[dict[str, Any]]) -> list[Finding]:
    """Every file that could not be used: named at scan (not an image, empty folder) or failed to decode."""
    out = [Finding("unreadable", s.reason, [s.path]) for s in ph.skipped if not s.path.endswith("/")]
    for i in np.flatnonzero(~f.ok):
        reason = stats[i].get("error") or next((s.reason for s in f.skipped if s.path == ph.rel(i)), "cannot decode")
        out.append(Finding("unreadable", reason, [ph.rel(i)], splits=[ph.split[i]], labels=[ph.label(i)]))
    return out


def exact_duplicates(ph: Photos, digests: Sequence[str | None], stats: list[dict[str, Any]]) -> list[Finding]:
    """Photos with the same decoded pixels (same bytes, or a re-saved copy): a group within a split is one
    ``exact-duplicate``; a validation or test photo with a copy in train is a ``leak``."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(stats):
        key = s.get("pixels") or (digests[i] if digests else None)
        if key:
            groups.setdefault(key, []).append(i)
    out: list[Finding] = []
    for members in (g for g in groups.values() if len(g) > 1):
        same_bytes = len({digests[i] for i in members}) == 1 if digests else False
        how = "exact-bytes" if same_bytes else "exact-pixels"
        rule = "same bytes" if same_bytes else "same decoded pixels, different files (a re-saved copy)"
        out += _within(ph, members, "exact-duplicate", rule, 1.0)
        train = [i for i in members if ph.split[i] == "train"]
        out += [_leak(ph, i, train[0], how, 1.0) for i in members if train and ph.split[i] != "train"]
    return out


def _within(ph: Photos, members: list[int], kind: str, rule: str, score: float) -> list[Finding]:
    """One finding per split holding two or more of ``members``."""
    out = []
    for split in dict.fromkeys(ph.split[i] for i in members):
        here = [i for i in members if ph.split[i] == split]
        if len(here) > 1:
            out.append(Finding(kind, rule, [ph.rel(i) for i in here], score, [split] * len(here), [ph.label(i) for i in here]))
    return out


def _leak(ph: Photos, i: int, j: int, how: str, sim: float) -> Finding:
    """Photo ``i`` (val/test) has the copy ``j`` in train."""
    same = bool(ph.labels[i] == ph.labels[j])
    what = "exact copy" if how.startswith("exact") else f"near copy (cosine {sim:.3f})"
    rule = (f"{ph.split[i]} photo with an {what} in train, " +
            ("same label: it inflates the score" if same else "different label: a conflict, one of the two labels is wrong"))
    return Finding("leak", rule, [ph.rel(i), ph.rel(j)], float(sim), [ph.split[i], "train"], [ph.label(i), ph.label(j)],
                   {"how": how, "same_label": same})


def similarity_findings(ph: Photos, f: features.Features, near: float, cfg: TrainConfig, found: list[Finding],
                        stats: list[dict[str, Any]]) -> list[Finding]:
    """Near duplicates and near leaks, likely mislabels and outliers: everything read from the embeddings."""
    rows = np.flatnonzero(f.ok)  # embedding row r is photo rows[r]
    if len(rows) < 2:
        return []
    x = normalised(f.x)
    exact = {frozenset(fd.paths) for fd in found if fd.kind in ("exact-duplicate", "leak")}
    # one row per distinct picture: exact copies are found already, and in a folder of repeated photos they would
    # fill every photo's nearest neighbours
    first: dict[Any, int] = {}
    for r, i in enumerate(rows):
        first.setdefault(stats[i].get("pixels") or i, r)
    uniq = np.array(sorted(first.values()))
    out = near_duplicates(ph, rows[uniq], x[uniq], near, exact, stats)
    out += mislabels(ph, rows, f.x, cfg)
    out += outliers(ph, rows[uniq], x[uniq])
    return out


def near_duplicates(ph: Photos, rows: np.ndarray, x: np.ndarray, near: float, exact: set[frozenset[str]],
                    stats: list[dict[str, Any]]) -> list[Finding]:
    """Copies that are not exact: the embeddings propose each photo's nearest photos (cosine ≥ ``CANDIDATE``), and
    ``copy_similarity`` of their thumbnails decides (≥ ``near``). A val/test photo with a copy in train is a
    ``leak`` (its most similar train copy); any other pair a ``near-duplicate``."""
    split = np.array([ph.split[i] for i in rows])
    thumbs = Thumbs(stats, rows)
    out: list[Finding] = []
    held_done: set[int] = set()
    for a, b, score in sorted(_verified(x, split, thumbs, near), key=lambda t: -t[2]):
        pair = frozenset((ph.rel(rows[a]), ph.rel(rows[b])))
        if pair in exact:
            continue
        if "train" in (split[a], split[b]) and split[a] != split[b]:
            held, train = (a, b) if split[b] == "train" else (b, a)
            if held not in held_done and not any(ph.rel(rows[held]) in e for e in exact):
                out.append(_leak(ph, int(rows[held]), int(rows[train]), "near", score))
                held_done.add(held)
        else:
            out.append(_pair(ph, int(rows[a]), int(rows[b]), score))
    return out


def _verified(x: np.ndarray, split: np.ndarray, thumbs: "Thumbs", near: float) -> list[tuple[int, int, float]]:
    """(a, b, copy similarity) of every candidate pair that is a copy: each photo's ``NEIGHBOURS`` nearest, and
    each val/test photo's nearest train photo."""
    idx, sim = nearest(x, x, NEIGHBOURS, same=True)
    cands = {(min(a, int(b)), max(a, int(b))) for a in range(len(x)) for b, v in zip(idx[a], sim[a]) if v >= CANDIDATE}
    train, held = np.flatnonzero(split == "train"), np.flatnonzero(split != "train")
    if len(train) and len(held):
        j, v = nearest(x[held], x[train], 1)
        cands |= {(min(int(a), int(b)), max(int(a), int(b))) for a, b, s in zip(held, train[j[:, 0]], v[:, 0]) if s >= CANDIDATE}
    scored = [(a, b, thumbs.similarity(a, b)) for a, b in sorted(cands)]
    return [(a, b, s) for a, b, s in scored if s >= near]


def _pair(ph: Photos, i: int, j: int, score: float) -> Finding:
    return Finding("near-duplicate", f"copy similarity {score:.3f} (the same picture resized, re-compressed, cropped or "
                                     f"brightened; threshold --near)", [ph.rel(i), ph.rel(j)],
                   score, [ph.split[i], ph.split[j]], [ph.label(i), ph.label(j)])


# ------------------------------------------------------------------------------------------ copy similarity


@functools.lru_cache(maxsize=8192)
def _area(lo: float, hi: float) -> np.ndarray:
    """(DETAIL, THUMB): each output pixel the mean of the input over its share of [lo, hi) (an anti-aliased resize);
    remembered, since the same boxes come back for every pair."""
    edges = lo + np.arange(DETAIL + 1) * (hi - lo) / DETAIL
    px = np.arange(THUMB)
    m = np.clip(np.minimum(edges[1:, None], px + 1) - np.maximum(edges[:-1, None], px), 0, None)
    return (m / np.maximum(m.sum(axis=1, keepdims=True), 1e-9)).astype(np.float32)


Box = tuple[float, float, float]  # (left, top, size) in shares of the thumbnail's side


def _resizers(boxes: Sequence[Box]) -> tuple[np.ndarray, np.ndarray]:
    """The row and column resize matrices of each box."""
    ry = np.stack([_area(round(t * THUMB, 3), round((t + s) * THUMB, 3)) for _, t, s in boxes])
    rx = np.stack([_area(round(left * THUMB, 3), round((left + s) * THUMB, 3)) for left, _, s in boxes])
    return ry, rx.transpose(0, 2, 1)


def views(thumb: np.ndarray, resizers: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """The detail (3 × 3 high-pass, normalised) of each box of the thumbnail, given the boxes' ``_resizers``."""
    ry, rxt = resizers
    z = np.matmul(ry @ thumb, rxt)
    p = np.pad(z, [(0, 0), (1, 1), (1, 1)], mode="edge")
    blur = sum(p[:, i:i + DETAIL, j:j + DETAIL] for i in range(3) for j in range(3)) / 9
    v = (z - blur).reshape(len(z), -1)
    v -= v.mean(axis=1, keepdims=True)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-6)


@functools.lru_cache(maxsize=1)
def _grid() -> tuple[list[Box], tuple[np.ndarray, np.ndarray]]:
    """The coarse search: the whole frame, then crops of 97.5 % down to 85 % of the side at 3 × 3 positions."""
    boxes: list[Box] = [(0.0, 0.0, 1.0)]
    for s in (0.975, 0.95, 0.925, 0.9, 0.875, 0.85):
        at = (0.0, (1 - s) / 2, 1 - s)
        boxes += [(left, top, s) for left in at for top in at]
    return boxes, _resizers(boxes)


def _refined(best: Box, step: float, ds: float) -> list[Box]:
    """The 27 boxes around ``best``: a little larger, the same and smaller, each shifted by ``step`` of the slack."""
    left, top, s = best
    out = []
    for size in (min(s + ds, 1.0), s, s - ds):
        for dl in (-step, 0.0, step):
            for dt in (-step, 0.0, step):
                out.append((min(max(left + dl * (1 - s), 0.0), 1 - size), min(max(top + dt * (1 - s), 0.0), 1 - size), size))
    return out


@dataclass
class Prepared:
    """A photo ready to compare: its thumbnail and the detail of every box of the coarse grid (``GRID`` order,
    the whole frame first), computed once per photo however many pairs it is in."""

    thumb: np.ndarray
    grid: np.ndarray

    @classmethod
    def of(cls, thumb: np.ndarray) -> "Prepared":
        return cls(thumb, views(thumb, _grid()[1]))


def _one_way(a: Prepared, b: Prepared) -> float:
    """How well photo ``b`` matches some crop of photo ``a``: the best box of a coarse grid, refined twice around it."""
    whole = b.grid[0]
    scores = a.grid @ whole
    best, top = _grid()[0][int(scores.argmax())], float(scores.max())
    if top < COARSE:  # most candidate pairs end here: not worth refining
        return top
    for step, ds in ((0.25, 0.0125), (0.125, 0.00625)):
        fine = _refined(best, step, ds)
        sc = views(a.thumb, _resizers(fine)) @ whole
        if sc.max() > top:
            top, best = float(sc.max()), fine[int(sc.argmax())]
    return top


def copy_similarity(a: np.ndarray | Prepared, b: np.ndarray | Prepared) -> float:
    """1.0 for the same picture; 0.77 or more (median 0.96) for a copy resized to 60–90 %, re-compressed at JPEG
    quality 30–60, cropped by 5–10 % and brightened a little; at most 0.74 for different photos of the same kind of scene
    (measured on clothing, BENCHMARKS.md). The correlation of fine detail (3 × 3 high-pass at 32 × 32) of
    one photo with the best-matching crop of the other, either way round. ``a``, ``b``: 64 × 64 thumbnails."""
    pa = a if isinstance(a, Prepared) else Prepared.of(a)
    pb = b if isinstance(b, Prepared) else Prepared.of(b)
    return max(_one_way(pa, pb), _one_way(pb, pa))


def thumbnail(stats: dict[str, Any]) -> np.ndarray | None:
    """The 64 × 64 grayscale thumbnail ``measure`` kept, as floats (None: the photo did not decode)."""
    b64 = stats.get("thumb")
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(THUMB, THUMB).astype(np.float32) if b64 else None


class Thumbs:
    """The photos to compare, prepared when first met and kept for the next pairs (at most ``KEEP`` at once:
    about 225 kB each, so memory stays bounded however large the folder)."""

    KEEP = 2048

    def __init__(self, stats: list[dict[str, Any]], rows: np.ndarray):
        self.stats, self.rows = stats, rows
        self.known: collections.OrderedDict[int, Prepared | None] = collections.OrderedDict()

    def get(self, r: int) -> Prepared | None:
        if r in self.known:
            self.known.move_to_end(r)
            return self.known[r]
        thumb = thumbnail(self.stats[self.rows[r]])
        self.known[r] = None if thumb is None else Prepared.of(thumb)
        if len(self.known) > self.KEEP:
            self.known.popitem(last=False)
        return self.known[r]

    def similarity(self, a: int, b: int) -> float:
        pa, pb = self.get(a), self.get(b)
        return -1.0 if pa is None or pb is None else copy_similarity(pa, pb)


def confident_learning(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Likely label errors, most suspect first, by confident learning (Northcutt et al., 2021) as cleanlab's
    ``find_label_issues(filter_by="low_self_confidence")`` does it: the confident joint counts the photos whose
    probability for another class reaches that class's own threshold (the mean probability the head gives it on
    photos labelled with it), and that many photos with the lowest probability of their given label are returned.
    Counting by the joint but choosing by self-confidence keeps a photo whose belief is split over several classes
    (measured: 48 of 50 moved labels in the top 100, against 37 when only the joint's own photos are kept)."""
    c = p.shape[1]
    thresholds = np.array([p[y == j, j].mean() if (y == j).any() else 1.0 for j in range(c)])
    above = p >= thresholds
    confident = np.where(above, p, -1.0).argmax(axis=1)
    n_issues = int((above.any(axis=1) & (confident != y)).sum())
    self_confidence = p[np.arange(len(y)), y]
    return np.argsort(self_confidence, kind="stable")[:n_issues]


def mislabels(ph: Photos, rows: np.ndarray, x: np.ndarray, cfg: TrainConfig) -> list[Finding]:
    """Likely mislabels, most suspect first, each with the class the out-of-fold head believes."""
    y = ph.labels[rows]
    p = heads.out_of_fold(x, y, len(ph.classes), cfg)
    order = confident_learning(p, y)
    out = []
    for r in order:
        i, guess = int(rows[r]), int(p[r].argmax())
        given = float(p[r, y[r]])
        out.append(Finding("mislabel", f"confident learning on out-of-fold probabilities: label '{ph.label(i)}' has p={given:.2f}, "
                                       f"'{ph.classes[guess]}' p={p[r, guess]:.2f}", [ph.rel(i)], 1 - given, [ph.split[i]],
                           [ph.label(i)], {"suggested": ph.classes[guess], "p_suggested": round(float(p[r, guess]), 4),
                                           "p_given": round(given, 4)}))
    return out


def robust_z(v: np.ndarray) -> np.ndarray:
    """(v - median) / (1.4826 × MAD): a z-score that a few extreme values cannot drag."""
    med = np.median(v)
    mad = 1.4826 * np.median(np.abs(v - med))
    return (v - med) / max(mad, 1e-6)


def outliers(ph: Photos, rows: np.ndarray, x: np.ndarray) -> list[Finding]:
    """Photos far from every class: their class affinity (``class_affinity``) is an outlier on the low side."""
    aff = class_affinity(x, ph.labels[rows], len(ph.classes))
    z = -robust_z(aff)
    return [Finding("outlier", f"far from every class: similarity {aff[r]:.3f} to its {CLASS_K} nearest photos of the closest "
                               f"class, {z[r]:.1f} robust deviations below the median", [ph.rel(int(rows[r]))], float(z[r]),
                    [ph.split[rows[r]]], [ph.label(int(rows[r]))]) for r in np.argsort(-z) if z[r] > OUTLIER_Z]


# ---------------------------------------------------------------------------------------------- quality


def quality_rules(s: dict[str, Any], colour_set: bool, blur_limit: float) -> list[tuple[str, str]]:
    """(kind, rule) for each quality rule one photo's statistics break. Thresholds from clothing and ants/bees: their
    photos all have a brightness spread over 13 and over 250 colours; all but two (a stock render of an ant on white,
    82 %; imageNotFound.gif, 89 %) at most 50 % of pixels one colour; a mean brightness of 46 to 204."""
    rules = []
    if s["std"] < 2 or s["colours"] < 64:
        rules.append(("placeholder", f"near-uniform, not a photo: brightness spread {s['std']:.1f}/255, "
                                     f"{s['colours']} distinct colours"))
    elif s["dominant"] > 0.7:  # also a product shot on a plain background: for a person to judge
        rules.append(("quality", f"mostly one colour ({s['dominant']:.0%} of pixels): a placeholder, a drawing or render, "
                                 f"or a subject on a plain background"))
    elif s["mean"] < 25 or s["mean"] > 245:
        rules.append(("quality", f"very {'dark' if s['mean'] < 25 else 'bright'}: mean brightness {s['mean']:.0f}/255"))
    elif s["sharpness"] < blur_limit:
        rules.append(("quality", f"blurry: sharpness (variance of the Laplacian) {s['sharpness']:.0f}, under {blur_limit:.0f} for this set"))
    elif colour_set and s["chroma"] < 2:
        rules.append(("quality", f"grayscale in a colour set (colour spread {s['chroma']:.1f}/255)"))
    short, long = sorted((s["width"], s["height"]))
    if short < 64:
        rules.append(("quality", f"tiny: {s['width']}×{s['height']} px"))
    if long > 4 * max(short, 1):
        rules.append(("quality", f"extreme aspect ratio {long / max(short, 1):.1f}:1 ({s['width']}×{s['height']} px)"))
    return rules


def quality(ph: Photos, stats: list[dict[str, Any]]) -> list[Finding]:
    """Image-quality findings; blur is judged against the set itself (a robust limit on log sharpness)."""
    good = [s for s in stats if "error" not in s]
    if not good:
        return []
    colour_set = np.mean([s["chroma"] >= 2 for s in good]) >= 0.9
    logs = np.log10(np.array([s["sharpness"] for s in good]) + 1)
    blur_limit = float(10 ** (np.median(logs) - 3.5 * 1.4826 * np.median(np.abs(logs - np.median(logs)))) - 1)
    out = []
    for i, s in enumerate(stats):
        if "error" not in s:
            out += [Finding(kind, rule, [ph.rel(i)], None, [ph.split[i]], [ph.label(i)]) for kind, rule in quality_rules(s, colour_set, blur_limit)]
    return out


def imbalance(ph: Photos) -> list[Finding]:
    """The training classes' sizes, when the largest has over 1.5× the smallest's photos (when class weights apply)."""
    train = ph.labels[[s == "train" for s in ph.split]]
    counts = np.bincount(train, minlength=len(ph.classes))
    if not len(train) or counts.max() <= 1.5 * max(counts.min(), 1):
        return []
    big, small = int(counts.argmax()), int(counts.argmin())
    return [Finding("imbalance", f"'{ph.classes[big]}' has {counts[big]} training photos, '{ph.classes[small]}' {counts[small]} "
                                 f"({counts[big] / max(counts[small], 1):.1f}×): training balances the loss (--class-weights)", [],
                    float(counts[big] / max(counts[small], 1)), info={"counts": dict(zip(ph.classes, map(int, counts)))})]


def _counts(ph: Photos) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for s, y in zip(ph.split, ph.labels):
        out.setdefault(s, {c: 0 for c in ph.classes})[ph.classes[y]] += 1
    return out


# ---------------------------------------------------------------------------------- the cheap part (train)


def leaks(feats: dict[str, features.Features], splits: dict[str, Split], classes: list[str], root: Path, cfg: TrainConfig,
          near: float = NEAR) -> dict[str, Any]:
    """Validation and test photos with a copy in train, from the embeddings and digests training already has: the
    same bytes, or a near copy (its nearest train photo by embedding, confirmed by ``copy_similarity``; only those
    few photos are decoded, once, into the statistics store). Per split: how many, and how many share the train
    copy's label (the points of accuracy they may be worth). ``audit`` finds the rest."""
    tr, ftr = splits["train"], feats["train"]
    out: dict[str, Any] = {"near": near, "pairs": []}
    for name in ("val", "test"):
        f, s = feats.get(name), splits.get(name)
        if f is None or s is None or not f.ok.any() or not len(ftr.x):
            continue
        pairs = _split_leaks(f, s, ftr, tr, cfg, near)
        same = sum(p["same_label"] for p in pairs)
        out[name] = {"n": len(s), "leaked": len(pairs), "same_label": same, "conflict": len(pairs) - same,
                     "points": round(100 * same / max(len(s), 1), 2)}
        out["pairs"] += [{"split": name, **p, "path": _shown(p["path"], root), "train_path": _shown(p["train_path"], root),
                          "label": classes[p["label"]], "train_label": classes[p["train_label"]]} for p in pairs]
    out["warning"] = leak_warning(out)
    return out


def _split_leaks(f: features.Features, s: Split, ftr: features.Features, tr: Split, cfg: TrainConfig,
                 near: float) -> list[dict[str, Any]]:
    """(val/test photo, train copy) rows of one split: same bytes first, then verified near copies."""
    by_digest = {d: k for k, d in enumerate(ftr.digests or []) if d}
    digests = f.digests or [None] * len(s)
    exact = {i: by_digest[d] for i, d in enumerate(digests) if d in by_digest}
    train_rows, held_rows = np.flatnonzero(ftr.ok), np.flatnonzero(f.ok)
    j, sim = nearest(normalised(f.x), normalised(ftr.x), 1)
    cands = [(int(i), int(train_rows[j[r, 0]])) for r, i in enumerate(held_rows) if sim[r, 0] >= CANDIDATE and i not in exact]
    scores = _pair_scores([s.paths[i] for i, _ in cands], [tr.paths[k] for _, k in cands],
                          [(digests[i], ftr.digests[k] if ftr.digests else None) for i, k in cands], cfg)
    rows = [_pair_row(s.paths[i], s.labels[i], tr.paths[k], tr.labels[k], "exact-bytes", 1.0) for i, k in exact.items()]
    return rows + [_pair_row(s.paths[i], s.labels[i], tr.paths[k], tr.labels[k], "near", v) for (i, k), v in zip(cands, scores) if v >= near]


def _pair_scores(held: list[Path], train: list[Path], digests: list[tuple[str | None, str | None]], cfg: TrainConfig) -> list[float]:
    """``copy_similarity`` of each (held-out photo, train photo) pair, on every core (numpy releases the GIL), and
    remembered by the pairs' content: a re-run on the same photos decodes and compares none."""
    if not held:
        return []
    known = all(a and b for a, b in digests)  # a photo that did not read has no content to remember it by
    store, name = cache.store(PAIRS, cfg.cache_dir), cache.key("leak-pairs", digests)
    scores = store.read_json(name) if known else None
    if isinstance(scores, list) and len(scores) == len(held):
        return scores
    stats = measure_all(held + train, [a for a, _ in digests] + [b for _, b in digests], cfg)
    n = len(held)
    with ThreadPoolExecutor(max(1, features.default_workers() + 1), thread_name_prefix="leaks") as pool:
        scores = list(pool.map(lambda m: _similarity(stats[m], stats[n + m]), range(n)))
    if known:
        store.write_json(name, scores)
    return scores


def _similarity(a: dict[str, Any], b: dict[str, Any]) -> float:
    ta, tb = thumbnail(a), thumbnail(b)
    return -1.0 if ta is None or tb is None else copy_similarity(ta, tb)


def _pair_row(path: Path, label: int, train_path: Path, train_label: int, how: str, sim: float) -> dict[str, Any]:
    return {"path": path, "label": int(label), "train_path": train_path, "train_label": int(train_label), "how": how,
            "similarity": round(float(sim), 4), "same_label": bool(label == train_label)}


def _shown(path: Path, root: Path) -> str:
    return features.shown_path(Path(path), root)


def leak_warning(summary: dict[str, Any]) -> str | None:
    """One sentence for the log and report.html, or None when nothing leaks."""
    parts = [f"{summary[n]['leaked']} of {summary[n]['n']} {n} photos have a copy in train ({summary[n]['same_label']} with "
             f"the same label, worth up to {summary[n]['points']:.1f} points of {n} accuracy; {summary[n]['conflict']} with "
             f"another label)" for n in ("val", "test") if summary.get(n, {}).get("leaked")]
    if not parts:
        return None
    inflated = any(summary.get(n, {}).get("same_label") for n in ("val", "test"))
    conflict = any(summary.get(n, {}).get("conflict") for n in ("val", "test"))
    said = [*(["a copy with the same label inflates the score"] if inflated else []),
            *(["a copy with another label means one of the two labels is wrong"] if conflict else [])]
    return "; ".join(parts) + f": {' and '.join(said)}. Run `headstart audit` on the data folder and exclude the train copies"


# -------------------------------------------------------------------------------------------------- files


def exclude_lines(a: Audit) -> list[str]:
    """exclude.txt: one path per line (relative to the data folder), ``# why`` after it. Safe suggestions are
    active (train copies of leaked photos, extra copies, unreadable files, placeholders in train); judgement calls
    and every validation or test photo are commented out for a person to decide."""
    lines = [f"# headstart audit of {a.root}: photos to leave out of training (headstart train DATA --exclude exclude.txt).",
             "# One path per line, relative to the data folder; '#' starts a comment: remove it to exclude a photo, add it to keep one.",
             "# Nothing has been deleted or moved. Never drop validation or test photos because the model disagrees with them",
             "# and then report the better score: that score is no longer an estimate of anything.", ""]
    seen: set[str] = set()
    for f in sorted(a.findings, key=lambda f: f.kind not in EXCLUDED_BY_DEFAULT):  # a path's safe reason first
        for path, split in _suggested(f):
            if path in seen:
                continue
            seen.add(path)
            active = f.kind in EXCLUDED_BY_DEFAULT and split == "train"
            lines.append(f"{'' if active else '# '}{path}  # {f.kind}: {f.rule}" + _suggestion(f))
    return lines


def _suggested(f: Finding) -> list[tuple[str, str]]:
    """(path, split) that the finding suggests leaving out: a leak's train copy, all but the first of duplicates."""
    if f.kind == "leak":
        return [(f.paths[1], "train")]
    if f.kind in ("exact-duplicate", "near-duplicate"):
        return list(zip(f.paths[1:], f.splits[1:]))
    return list(zip(f.paths, f.splits or ["?"] * len(f.paths)))


def _suggestion(f: Finding) -> str:
    return f" (suggested: {f.info['suggested']}, p={f.info['p_suggested']:.2f})" if f.kind == "mislabel" else ""


def write(a: Audit, out: Path, ph: Photos) -> None:
    """audit.json, exclude.txt and audit.html (self-contained, thumbnails embedded) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "audit.json", json.dumps(a.to_dict(), indent=1))
    atomic_write_text(out / "exclude.txt", "\n".join(exclude_lines(a)) + "\n")
    render_page("audit.html", page(a, ph), out / "audit.html")
    a.out = out


KIND_TITLES = {
    "unreadable": ("Unreadable files", "Not used by training: fix or remove them."),
    "leak": ("Leaks across splits", "A validation or test photo whose copy is in train: the score counts it as seen. "
                                    "Same label: the score is inflated; another label: one of the two is wrong."),
    "exact-duplicate": ("Exact duplicates", "The same picture twice in one split: it counts twice."),
    "near-duplicate": ("Near duplicates", "Almost the same picture (resized, re-compressed, cropped)."),
    "mislabel": ("Likely mislabels", "The out-of-fold head confidently prefers another class: look, and fix the label if it is wrong."),
    "outlier": ("Outliers", "Far from every class: off-topic, or a rare view worth more photos like it."),
    "placeholder": ("Placeholders", "Near-uniform images and icons: noise with a label."),
    "quality": ("Image quality", "Mostly one colour ('image not found' pictures, renders), very dark or bright, blurry, "
                                 "tiny, extreme aspect ratio, grayscale in a colour set."),
    "imbalance": ("Class imbalance", "Training balances the loss; more photos of the small classes help more."),
}


def page(a: Audit, ph: Photos) -> dict[str, Any]:
    """audit.html's data: per kind, its findings as plain values, the first ``THUMBS`` with pictures."""
    where = {ph.rel(i): p for i, p in enumerate(ph.paths)}
    sections = []
    for kind, (title, about) in KIND_TITLES.items():
        found = a.of(kind)
        if found:
            sections.append({"kind": kind, "title": title, "about": about, "n": len(found),
                             "cards": [_card(f, where, n < THUMBS) for n, f in enumerate(found)]})
    return {"title": f"audit — {a.root.name}", "root": str(a.root), "near": a.near, "sections": sections,
            "summary": [(KIND_TITLES[k][0], n) for k, n in a.summary().items()],
            "counts": [(split, sum(c.values())) for split, c in a.counts.items()]}


def _card(f: Finding, where: dict[str, Path], pictures: bool) -> dict[str, Any]:
    photos = [{"path": p, "split": s, "label": lab, "img": _thumb(where.get(p), p) if pictures else None}
              for p, s, lab in zip(f.paths, f.splits or [""] * len(f.paths), f.labels or [""] * len(f.paths))]
    return {"rule": f.rule, "score": None if f.score is None else f"{f.score:.3f}", "photos": photos,
            "suggested": f"{f.info['suggested']} ({f.info['p_suggested']:.0%})" if f.kind == "mislabel" else None}


def _thumb(path: Path | None, name: str) -> dict[str, str] | None:
    if path is None:
        return None
    try:
        return picture(jpeg_thumbnail(open_rgb(path, 160)), name, "thumb", "image/jpeg")
    except ValueError:
        return None
