"""Backbone embeddings, computed once per image and kept in an on-disk cache.

An entry's key is the image's content hash inside a folder keyed by backbone + weights digest +
preprocessing + precision, so renaming or moving photos costs nothing and a changed photo is recomputed.
Entries are written atomically (temporary file + rename): a killed run leaves no half-written entry, and two
runs sharing a cache can only ever write the same bytes to the same name.

``extract`` is a plain function of (list of images → embeddings); ``extract_sharded`` splits it across the
processes of a torchrun job and gathers the pieces.

Two runtimes can run the frozen backbone. On a CPU the default is ONNX Runtime in fp32: measured here it runs
EfficientNet-Lite0 at 4× PyTorch's fp32 eager speed and faster than PyTorch's bf16 (which needs AVX-512 BF16/AMX),
with fp32's numbers. The backbone is exported once per weights digest, checked against PyTorch and kept in the
cache folder. PyTorch runs it on a GPU, for augmented views, with ``precision="bf16"`` and wherever the export fails.
Photos are decoded by a thread pool while the backbone runs (both release the GIL) and travel as uint8 pixels;
normalisation happens on the whole batch, inside the ONNX graph or on the device.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import config, distributed
from .backbones import LoadedBackbone
from .data import Skipped, open_rgb
from .files import atomic_path, atomic_write_text, sha256_file

if TYPE_CHECKING:  # imported where the backbone runs: a fully cached extraction never needs them
    import torch

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnxruntime", "pytorch")
# ONNX Runtime is fastest here with small batches (they stay in cache): Lite0, 2 threads, img/s at batch
# 1/8/16/32/64 = 136/145/132/118/115. PyTorch keeps the configured batch size.
ORT_BATCH = 8


@dataclass
class Features:
    """Embeddings for the images that decoded; ``ok[i]`` says whether ``paths[i]`` has a row in ``x``."""

    x: np.ndarray  # (n_ok, d) float32
    ok: np.ndarray  # (n,) bool
    skipped: list[Skipped] = field(default_factory=list)
    computed: int = 0  # embeddings computed by the backbone in this call (the rest came from the cache)
    seconds: float = 0.0
    runtime: str = "pytorch"  # what computed them: "onnxruntime" (fp32) or "pytorch"


# ------------------------------------------------------------------------------------------ fast forward


def bf16_supported() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX-512 BF16 / AMX); elsewhere bf16 is slower."""
    if not _cpu_has_native_bf16():
        return False
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
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
    import torch

    return model.eval().to(memory_format=torch.channels_last)


@contextlib.contextmanager
def autocast(precision: str, device_type: str = "cpu") -> Iterator[None]:
    if precision == "bf16":
        import torch

        with torch.autocast(device_type, dtype=torch.bfloat16):
            yield
    else:
        yield


def embed(model: torch.nn.Module, batch: torch.Tensor | np.ndarray, precision: str, data_config: dict[str, Any] | None = None) -> torch.Tensor:
    """Globally pooled backbone features (timm's pre-logits), as float32 on the CPU.

    ``batch`` is either normalised float NCHW, or uint8 NHWC pixels (then ``data_config`` gives mean/std):
    normalised here, on the model's device, which makes it channels_last without a copy.
    """
    import torch

    dev = next(model.parameters()).device
    with torch.inference_mode(), autocast(precision, dev.type):
        if isinstance(batch, np.ndarray):
            x = normalize(torch.from_numpy(batch).to(dev), data_config)
        else:
            x = batch.to(dev)
        x = x.contiguous(memory_format=torch.channels_last)
        out = model.forward_head(model.forward_features(x), pre_logits=True)
    return out.float().cpu()


def normalize(pixels: torch.Tensor, data_config: dict[str, Any]) -> torch.Tensor:
    """uint8 NHWC → float NCHW: what timm's ToTensor + Normalize make of each image (to float rounding)."""
    import torch

    mean = torch.tensor(data_config["mean"], device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"], device=pixels.device).view(1, 3, 1, 1)
    return (pixels.permute(0, 3, 1, 2).float() / 255 - mean) / std


# -------------------------------------------------------------------------------------------- decoding


def eval_transform(data_config: dict[str, Any]):
    """timm's own inference preprocessing for this model (resize, centre crop, normalise)."""
    import timm.data

    cfg = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data_config.items()}
    return timm.data.create_transform(**cfg, is_training=False)


def decode_size(data_config: dict[str, Any]) -> int:
    """The shortest side the preprocessing resizes to: JPEGs may be decoded at reduced scale down to it."""
    size = data_config["input_size"][-1]
    return int(np.ceil(size / data_config.get("crop_pct", 1.0)))


def pixel_transform(data_config: dict[str, Any]):
    """timm's eval preprocessing up to, not including, ToTensor/Normalize: PIL image → uint8 HWC array.

    Batches travel as uint8 (a quarter of float32's bytes) and are normalised in one vectorised step.
    """
    steps = [t for t in eval_transform(data_config).transforms if type(t).__name__ not in ("ToTensor", "MaybeToTensor", "Normalize")]
    size = tuple(int(v) for v in data_config["input_size"][-2:])

    def to_pixels(img):
        for t in steps:
            img = t(img)
        a = np.asarray(img, dtype=np.uint8)
        if a.shape != (*size, 3):  # a timm transform this code does not know about: fail loudly, not silently
            raise RuntimeError(f"preprocessing gave {a.shape}, expected {(*size, 3)}")
        return a

    return to_pixels


def default_workers() -> int:
    """Decode workers: one per core beyond the first (the forward pass keeps one busy), the machine's cores
    shared among the torchrun processes on it. Threads for extraction, processes for fine-tuning."""
    return max(0, min(4, (os.cpu_count() or 1) // distributed.local_world() - 1))


def decoded_batches(paths: Sequence[Path], data_config: dict[str, Any], batch_size: int, workers: int = -1,
                    transform=None, seeds: Sequence[int] | None = None) -> Iterator[tuple[list[int], Any, list[tuple[int, str]]]]:
    """``(indices, batch, bad)`` in order: ``batch`` is uint8 NHWC pixels (or, with a ``transform``, its stacked
    tensors; ``None`` when no image of the batch decoded); ``bad`` pairs an index with the reason it was skipped.

    ``workers`` threads decode up to ``workers + 1`` batches ahead of the consumer. Pillow and the backbone both release the
    GIL, so threads overlap them without the start-up and pickling costs of worker processes. An augmented view
    seeds the global RNGs per image, so seeding and transforming hold a lock: same image, view and seed → same pixels.
    """
    workers = default_workers() if workers < 0 else workers
    if seeds is not None:
        from . import augment
    min_size = decode_size(data_config)
    to_pixels = transform or pixel_transform(data_config)
    lock = threading.Lock()

    def one(i: int):
        try:
            img = open_rgb(paths[i], min_size)
            if seeds is None:
                return to_pixels(img), ""
            with lock:
                augment.seed(seeds[i])
                return to_pixels(img), ""
        except ValueError as e:
            return None, str(e)
        except Exception as e:  # noqa: BLE001 - a decoder bug on one file must not stop the run
            return None, f"cannot decode ({type(e).__name__}: {e})"

    def batch(idx: list[int]):
        items = [(i, *one(i)) for i in idx]
        good = [(i, x) for i, x, _ in items if x is not None]
        xs = [x for _, x in good]
        stacked = (np.stack(xs) if isinstance(xs[0], np.ndarray) else _torch_stack(xs)) if xs else None
        return [i for i, _ in good], stacked, [(i, err) for i, x, err in items if x is None]

    chunks = [list(range(k, min(k + batch_size, len(paths)))) for k in range(0, len(paths), batch_size)]
    if workers == 0:
        yield from map(batch, chunks)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        ahead: deque = deque()
        for c in chunks:
            ahead.append(pool.submit(batch, c))
            if len(ahead) > workers + 1:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _torch_stack(tensors: list):
    import torch

    return torch.stack(tensors)


# ----------------------------------------------------------------------------------------------- cache


def cache_key(lb: LoadedBackbone, precision: str, view: tuple | None = None, device: str = "cpu", runtime: str = "pytorch") -> str:
    """Everything that changes an embedding, and nothing else."""
    desc = {
        **({"device": device} if device != "cpu" else {}),  # GPU kernels round differently; CPU keys unchanged
        **({"runtime": runtime} if runtime != "pytorch" else {}),
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
    runtime: str = "auto",
) -> Features:
    """Embeddings of ``paths`` (cached ones read back, the rest computed in batches and cached).

    With ``augment_policy``, the embeddings of augmented view number ``view`` of each image (deterministic in image
    content, view and seed, hence cacheable like any other embedding).
    """
    import time

    start = time.perf_counter()
    device_type = distributed.device_type()
    runtime = resolve_runtime(runtime, precision, device_type, augmented=bool(augment_policy))
    if runtime == "onnxruntime" and export_refused(lb, cache_dir):
        runtime = "pytorch"
    view_key = (augment_policy, view, seed) if augment_policy else None
    digests = [file_digest(Path(p)) for p in paths] if use_cache else [None] * len(paths)

    def lookup() -> tuple[FeatureCache | None, list[np.ndarray | None], list[int]]:
        """The cache for this runtime, the vectors it holds for ``paths`` and the indices it lacks."""
        prec = "fp32" if runtime == "onnxruntime" else resolve_precision(precision)
        cache = FeatureCache(config.cache_dir(cache_dir), cache_key(lb, prec, view_key, device_type, runtime)) if use_cache else None
        hits = [cache.get(d) if cache and d else None for d in digests]
        hits = [h if h is not None and h.shape == (lb.num_features,) else None for h in hits]
        return cache, hits, [i for i, h in enumerate(hits) if h is None]

    # The cache is read before anything is built: a run it answers in full needs neither the backbone nor a runtime.
    cache, vectors, todo = lookup()
    session = ort_session(lb, cache_dir) if todo and runtime == "onnxruntime" else None
    if todo and runtime == "onnxruntime" and session is None:
        runtime = "pytorch"  # the export failed its check (logged): PyTorch computes the same embeddings
        cache, vectors, todo = lookup()
    reasons: dict[int, str] = {}

    if todo:
        if session is not None:
            forward, batch_size = (lambda b: session.run(None, {"pixels": b})[0]), min(batch_size, ORT_BATCH)
        else:
            dev, prec = distributed.device(), resolve_precision(precision)
            model = prepare(lb.model).to(dev)
            forward = lambda b: embed(model, b, prec, lb.data_config).numpy()  # noqa: E731
        transform = seeds = None
        if augment_policy:
            from . import augment

            transform = augment.train_transform(lb.data_config, augment_policy)
            seeds = [(int(digests[i][:15], 16) if digests[i] else i) + 7919 * view + 104_729 * seed for i in todo]
        bar = tqdm(total=len(todo), desc=f"features {lb.spec.name}", unit="img", disable=not progress, leave=False)
        for idx, batch, bad in decoded_batches([paths[i] for i in todo], lb.data_config, batch_size, workers, transform, seeds):
            for j, err in bad:
                reasons[todo[j]] = err
            if batch is not None:
                for j, vec in zip(idx, forward(batch)):
                    i = todo[j]
                    vectors[i] = vec
                    if cache and digests[i]:
                        cache.put(digests[i], vec)
            bar.update(len(idx) + len(bad))
        bar.close()
        if session is None:
            lb.model.to("cpu")  # the rest of the pipeline (head, bundle) expects the backbone on the CPU

    ok = np.array([v is not None for v in vectors], dtype=bool)
    x = np.stack([v for v in vectors if v is not None]).astype(np.float32) if ok.any() else np.zeros((0, lb.num_features), np.float32)
    skipped = [Skipped(_show(paths[i], root), reasons.get(i, "cannot decode")) for i in np.flatnonzero(~ok)]
    return Features(x, ok, skipped, computed=len(todo) - len(reasons), seconds=time.perf_counter() - start, runtime=runtime)


# ------------------------------------------------------------------------------------------ ONNX Runtime


def resolve_runtime(runtime: str = "auto", precision: str = "auto", device_type: str = "cpu", augmented: bool = False) -> str:
    """What runs the backbone. ``auto``: ONNX Runtime (fp32) on a CPU, PyTorch on a GPU, for augmented views
    (their random transforms produce float tensors) and when bf16 is asked for explicitly."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "pytorch" or augmented:
        return "pytorch"
    usable = device_type == "cpu" and precision != "bf16"
    if runtime == "onnxruntime" and not usable:
        raise ValueError("the onnxruntime runtime runs fp32 on the CPU: use precision auto/fp32 without a GPU, or runtime pytorch")
    return "onnxruntime" if usable else "pytorch"


_REFUSED: dict[str, str] = {}  # graph key → why its export was refused: tried, and said, once per process


def export_refused(lb: LoadedBackbone, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when this backbone's export was refused in this process, or by an earlier run with the same libraries
    (``<cache>/onnx/<key>.refused.json``): a cached re-run goes straight to PyTorch instead of trying again."""
    exported = _exported_file(lb, cache_dir)
    key, path = exported.stem, exported.with_suffix(".refused.json")
    if key in _REFUSED:
        return True
    try:
        known = json.loads(path.read_text())
        if known["libraries"] == _export_libraries():
            _REFUSED[key] = known["why"]
            log.warning("ONNX Runtime cannot run %s (%s; found by an earlier run, delete %s to try again); using PyTorch",
                        lb.spec.name, known["why"], path)
            return True
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return False


def _exported_file(lb: LoadedBackbone, cache_dir: str | os.PathLike | None) -> Path:
    """``<cache>/onnx/<key>.onnx``; beside it, ``<key>.refused.json`` when the export failed its check."""
    return config.cache_dir(cache_dir) / "onnx" / f"{cache_key(lb, 'fp32', runtime='onnxruntime')}.onnx"


def _export_libraries() -> list[str]:
    from importlib.metadata import version

    from .config import __version__

    return [__version__] + [version(p) for p in ("torch", "timm", "onnx", "onnxruntime")]


def ort_session(lb: LoadedBackbone, cache_dir: str | os.PathLike | None = None):
    """An ONNX Runtime session computing this backbone's embeddings from uint8 NHWC pixels, or None when the
    backbone does not export faithfully (the reason is logged once).

    The graph is exported and checked against PyTorch once per weights digest and preprocessing, then read back
    from ``<cache>/onnx/``. A damaged file there is exported again; a cache folder that cannot be written only
    costs the export again next time.
    """
    if export_refused(lb, cache_dir):
        return None
    path = _exported_file(lb, cache_dir)
    import torch

    threads = torch.get_num_threads()
    if path.is_file():
        try:
            st = path.stat()  # in the session cache's key: a file replaced on disk is opened anew
            return _session(str(path), threads, (st.st_mtime_ns, st.st_size))
        except Exception as e:  # noqa: BLE001 - whatever ORT says of a damaged file, the cure is a fresh export
            log.warning("the exported backbone %s cannot be read (%s); exporting it again", path, str(e).splitlines()[0][:200])
    from .export import ExportError, embedding_onnx

    try:
        data = embedding_onnx(lb)
    except ExportError as e:
        _REFUSED[path.stem] = str(e)
        log.warning("ONNX Runtime cannot run %s (%s); using PyTorch", lb.spec.name, e)
        with contextlib.suppress(OSError):  # remembered, so later runs do not try (and fail) again
            atomic_write_text(path.with_suffix(".refused.json"), json.dumps({"why": str(e), "libraries": _export_libraries()}))
        return None
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except OSError as e:
        log.warning("cannot keep the exported backbone in %s (%s); it will be exported again next run", path.parent, e)
        return _session(data, threads)
    st = path.stat()
    return _session(str(path), threads, (st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=4)
def _session(model: str | bytes, threads: int, _stamp: tuple = ()):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only
    opts.intra_op_num_threads = threads
    # No busy-waiting between batches: the decode threads need that core. Measured: 80 → 110 img/s end to end.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


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
    return Features(x, ok, [skipped[i] for i in sorted(skipped)], computed=computed, seconds=seconds, runtime=mine.runtime)


def _show(path: Path, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return str(Path(path).relative_to(root))
    return str(path)
