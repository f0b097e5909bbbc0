"""Backbone embeddings, computed once per image and kept in an on-disk cache.

An entry's key is the image's content hash inside a folder keyed by backbone + weights digest +
preprocessing + precision, so renaming or moving photos costs nothing and a changed photo is recomputed.
Entries are written atomically (temporary file + rename): a killed run leaves no half-written entry, and two
runs sharing a cache can only ever write the same bytes to the same name.

``extract`` is a plain function of (list of images → embeddings); ``extract_sharded`` splits it across the
processes of a torchrun job and gathers the pieces.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import timm
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from . import augment, config, distributed
from .backbones import LoadedBackbone
from .data import Skipped, open_rgb
from .files import atomic_path, sha256_file


@dataclass
class Features:
    """Embeddings for the images that decoded; ``ok[i]`` says whether ``paths[i]`` has a row in ``x``."""

    x: np.ndarray  # (n_ok, d) float32
    ok: np.ndarray  # (n,) bool
    skipped: list[Skipped] = field(default_factory=list)
    computed: int = 0  # embeddings computed by the backbone in this call (the rest came from the cache)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------ fast forward


def bf16_supported() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX-512 BF16 / AMX); elsewhere bf16 is slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and _cpu_has_native_bf16()
    except (AttributeError, RuntimeError):
        return False


def _cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str = "auto") -> str:
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, not {precision!r}")
    return precision


def prepare(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode, channels_last: the layout oneDNN's CPU convolutions are fastest with (about 2× here)."""
    return model.eval().to(memory_format=torch.channels_last)


@contextlib.contextmanager
def autocast(precision: str, device_type: str = "cpu") -> Iterator[None]:
    if precision == "bf16":
        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    else:
        yield


def embed(model: torch.nn.Module, batch: torch.Tensor, precision: str) -> torch.Tensor:
    """Globally pooled backbone features (timm's pre-logits), as float32 on the CPU."""
    dev = next(model.parameters()).device
    with torch.inference_mode(), autocast(precision, dev.type):
        x = batch.to(dev).contiguous(memory_format=torch.channels_last)
        out = model.forward_head(model.forward_features(x), pre_logits=True)
    return out.float().cpu()


# -------------------------------------------------------------------------------------------- decoding


def eval_transform(data_config: dict[str, Any]):
    """timm's own inference preprocessing for this model (resize, centre crop, normalise)."""
    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()}
    return timm.data.create_transform(**cfg, is_training=False)


def decode_size(data_config: dict[str, Any]) -> int:
    """The shortest side the preprocessing resizes to: JPEGs may be decoded at reduced scale down to it."""
    size = data_config["input_size"][-1]
    return int(np.ceil(size / data_config.get("crop_pct", 1.0)))


class _Images(torch.utils.data.Dataset):
    """Decodes in loader workers, in parallel with the forward pass; errors travel back as strings."""

    def __init__(self, paths: Sequence[Path], transform, min_size: int, seeds: Sequence[int] | None = None):
        self.paths, self.transform, self.min_size, self.seeds = list(paths), transform, min_size, seeds

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = open_rgb(self.paths[i], self.min_size)
            if self.seeds is not None:  # an augmented view: the same image, view and seed give the same pixels
                augment.seed(self.seeds[i])
            return i, self.transform(img), ""
        except ValueError as e:
            return i, None, str(e)
        except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop the run
            return i, None, f"cannot decode ({type(e).__name__}: {e})"


def _collate(items):
    good = [(i, t) for i, t, err in items if t is not None]
    bad = [(i, err) for i, t, err in items if t is None]
    batch = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], batch, bad


def default_workers() -> int:
    """Decode processes: one per core beyond the first (the forward pass keeps one busy), the machine's cores
    shared among the torchrun processes on it."""
    return max(0, min(4, (os.cpu_count() or 1) // distributed.local_world() - 1))


# ----------------------------------------------------------------------------------------------- cache


def cache_key(lb: LoadedBackbone, precision: str, view: tuple | None = None, device: str = "cpu") -> str:
    """Everything that changes an embedding, and nothing else."""
    desc = {
        **({"device": device} if device != "cpu" else {}),  # GPU kernels round differently; CPU keys unchanged
        "view": view,
        "timm": lb.spec.timm_name,
        "kwargs": lb.spec.kwargs,
        "weights": lb.digest,
        "preprocess": lb.data_config,
        "precision": precision,
        "version": 1,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def file_digest(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


class FeatureCache:
    """``root/<key>/<ab>/<sha256>.npy``: one small file per image, each written atomically."""

    def __init__(self, root: Path, key: str):
        self.dir = Path(root) / key

    def _path(self, digest: str) -> Path:
        return self.dir / digest[:2] / f"{digest}.npy"

    def get(self, digest: str) -> np.ndarray | None:
        try:
            return np.load(self._path(digest), allow_pickle=False)
        except (OSError, ValueError):
            return None  # absent, or unreadable: recompute

    def put(self, digest: str, vector: np.ndarray) -> None:
        with atomic_path(self._path(digest)) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(vector, dtype=np.float32), allow_pickle=False)


# -------------------------------------------------------------------------------------------- extract


def extract(
    paths: Sequence[Path],
    lb: LoadedBackbone,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    batch_size: int = 32,
    precision: str = "auto",
    workers: int = -1,
    progress: bool = True,
    root: Path | None = None,
    augment_policy: str | None = None,
    view: int = 0,
    seed: int = 0,
) -> Features:
    """Embeddings of ``paths`` (cached ones read back, the rest computed in batches and cached).

    With ``augment_policy``, the embeddings of augmented view number ``view`` of each image (deterministic in image
    content, view and seed, hence cacheable like any other embedding).
    """
    import time

    start = time.perf_counter()
    precision = resolve_precision(precision)
    view_key = (augment_policy, view, seed) if augment_policy else None
    dev = distributed.device()
    cache = FeatureCache(config.cache_dir(cache_dir), cache_key(lb, precision, view_key, dev.type)) if use_cache else None
    n = len(paths)
    vectors: list[np.ndarray | None] = [None] * n
    digests: list[str | None] = [None] * n
    reasons: dict[int, str] = {}
    todo: list[int] = []
    for i, p in enumerate(paths):
        digests[i] = d = file_digest(Path(p)) if cache else None
        hit = cache.get(d) if cache and d else None
        if hit is not None and hit.shape == (lb.num_features,):
            vectors[i] = hit
        else:
            todo.append(i)

    if todo:
        model = prepare(lb.model).to(dev)
        workers = default_workers() if workers < 0 else workers
        if augment_policy:
            transform = augment.train_transform(lb.data_config, augment_policy)
            seeds = [(int(digests[i][:15], 16) if digests[i] else i) + 7919 * view + 104_729 * seed for i in todo]
        else:
            transform, seeds = eval_transform(lb.data_config), None
        loader = DataLoader(
            _Images([paths[i] for i in todo], transform, decode_size(lb.data_config), seeds),
            batch_size=batch_size,
            num_workers=min(workers, max(0, len(todo) // batch_size)),
            collate_fn=_collate,
        )
        bar = tqdm(total=len(todo), desc=f"features {lb.spec.name}", unit="img", disable=not progress, leave=False)
        for idx, batch, bad in loader:
            for j, err in bad:
                reasons[todo[j]] = err
            if batch is not None:
                out = embed(model, batch, precision).numpy()
                for j, vec in zip(idx, out):
                    i = todo[j]
                    vectors[i] = vec
                    if cache and digests[i]:
                        cache.put(digests[i], vec)
            bar.update(len(idx) + len(bad))
        bar.close()
        lb.model.to("cpu")  # the rest of the pipeline (head, bundle) expects the backbone on the CPU

    ok = np.array([v is not None for v in vectors], dtype=bool)
    x = np.stack([v for v in vectors if v is not None]).astype(np.float32) if ok.any() else np.zeros((0, lb.num_features), np.float32)
    skipped = [Skipped(_show(paths[i], root), reasons.get(i, "cannot decode")) for i in np.flatnonzero(~ok)]
    return Features(x, ok, skipped, computed=len(todo) - len(reasons), seconds=time.perf_counter() - start)


def extract_sharded(paths: Sequence[Path], lb: LoadedBackbone, **kw: Any) -> Features:
    """``extract`` across the processes of a torchrun job, with the result of a single process on every rank.

    Rank r computes (and caches) ``paths[r::world]``: disjoint, deterministic, and balanced even when some images
    are cached already, because photos added later are spread over every class folder. The shards travel back
    through ``all_gather``, so machines need not share a cache folder. Progress is shown by rank 0 for its shard.
    """
    r, w = distributed.rank(), distributed.world()
    if w == 1:
        return extract(paths, lb, **kw)
    mine = extract(list(paths)[r::w], lb, **{**kw, "progress": kw.get("progress", True) and r == 0})
    n = len(paths)
    ok = np.zeros(n, dtype=bool)
    rows: dict[int, np.ndarray] = {}
    skipped: dict[int, Skipped] = {}
    computed, seconds = 0, 0.0
    for k, part in enumerate(distributed.all_gather(mine)):
        idx = np.arange(k, n, w)
        ok[idx] = part.ok
        rows.update(zip(idx[part.ok].tolist(), part.x))
        skipped.update(zip(idx[~part.ok].tolist(), part.skipped))
        computed, seconds = computed + part.computed, max(seconds, part.seconds)
    x = np.stack([rows[i] for i in np.flatnonzero(ok)]) if ok.any() else np.zeros((0, lb.num_features), np.float32)
    return Features(x, ok, [skipped[i] for i in sorted(skipped)], computed=computed, seconds=seconds)


def _show(path: Path, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return str(Path(path).relative_to(root))
    return str(path)
