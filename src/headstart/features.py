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
cache folder (``onnx.feature_session``). PyTorch runs it on a GPU, for augmented views, with ``precision="bf16"`` and wherever the export fails.
``precision="int8"`` runs it quantized in ONNX Runtime, calibrated on a sample of the run's training photos
(``calibration_sample``, ``onnx.int8_session``): faster, but not the default (BENCHMARKS.md, "int8", says why).
Photos are decoded by a thread pool while the backbone runs (both release the GIL) and travel as uint8 pixels;
normalisation happens on the whole batch, inside the ONNX graph or on the device.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import cache, distributed, onnx, transforms
from .backbones import LoadedBackbone
from .config import choices
from .data import Skipped, open_rgb
from .files import sha256_file
from .transforms import decode_size, normalize, pixel_transform

if TYPE_CHECKING:  # imported where the backbone runs: a fully cached extraction never needs them
    import torch

log = logging.getLogger(__name__)

RUNTIMES = choices("runtime")  # TrainConfig's list: the one place it is written
# ONNX Runtime is fastest here with small batches (they stay in cache): Lite0, 2 threads, img/s at batch
# 1/8/16/32/64 = 136/145/132/118/115. PyTorch keeps the configured batch size.
ORT_BATCH = 8
# What precision="auto" runs in ONNX Runtime on a CPU. fp32 unless int8 keeps the default backbone's validation
# accuracy within 0.5 pt of fp32 on both shared data sets and pays for its quantization on a first run (BENCHMARKS.md,
# "int8": with VNNI it kept the accuracy, but its 3.4 s of quantizing a new training set pay back only past ~2 800 photos).
ORT_AUTO = "fp32"
CALIBRATION_PHOTOS = 64  # int8: training photos its activation ranges are calibrated on (spread over the classes)


@dataclass
class Features:
    """Embeddings for the images that decoded; ``ok[i]`` says whether ``paths[i]`` has a row in ``x``."""

    x: np.ndarray  # (n_ok, d) float32
    ok: np.ndarray  # (n,) bool
    skipped: list[Skipped] = field(default_factory=list)
    computed: int = 0  # embeddings computed by the backbone in this call (the rest came from the cache)
    seconds: float = 0.0
    runtime: str = "pytorch"  # what computed them: "onnxruntime" or "pytorch"
    precision: str = "fp32"  # at what precision: "int8" (ONNX Runtime), "fp32", "bf16" (PyTorch)
    calibration: tuple[str, ...] = ()  # int8: the content digests of the photos its graph was calibrated on
    digests: list[str | None] = field(default_factory=list)  # sha256 of each file in ``paths`` (None: unreadable); the audit's exact duplicates


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
    """PyTorch's precision. ``int8`` is ONNX Runtime's: what PyTorch runs of such a run (fine-tuning, augmented
    views, a backbone that does not export) runs in fp32."""
    if precision == "auto":
        return "bf16" if bf16_supported() else "fp32"
    if precision == "int8":
        return "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be one of {', '.join(choices('precision'))}, not {precision!r}")
    return precision


def ort_precision(precision: str = "auto") -> str:
    """ONNX Runtime's precision for the frozen backbone: ``int8`` or ``fp32`` (``auto``: ``ORT_AUTO``)."""
    return ORT_AUTO if precision == "auto" else "int8" if precision == "int8" else "fp32"


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


def embed(model: torch.nn.Module, batch: torch.Tensor | np.ndarray, precision: str, data_config: dict[str, Any] | None = None,
          output: str = "embedding") -> torch.Tensor:
    """Globally pooled backbone features (timm's pre-logits; or the ImageNet ``logits``), as float32 on the CPU.

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
        out = model.forward_head(model.forward_features(x), pre_logits=output == "embedding")
    return out.float().cpu()


# -------------------------------------------------------------------------------------------- decoding


def default_workers() -> int:
    """Decode workers: one per core beyond the first (the forward pass keeps one busy), of the cores this process
    may use (``distributed.cores``). Threads for extraction, processes for fine-tuning."""
    return max(0, min(4, distributed.cores() - 1))


def decoded_batches(paths: Sequence[Path], data_config: dict[str, Any], batch_size: int, workers: int = -1,
                    transform=None, seeds: Sequence[int] | None = None,
                    then: Callable[[Any], Any] | None = None) -> Iterator[tuple[list[int], Any, list[tuple[int, str]]]]:
    """``(indices, batch, bad)`` in order: ``batch`` is uint8 NHWC pixels (or, with a ``transform``, its stacked
    tensors; ``None`` when no image of the batch decoded); ``bad`` pairs an index with the reason it was skipped.

    ``workers`` threads decode up to ``workers + 1`` batches ahead of the consumer. Pillow and the backbone both release the
    GIL, so threads overlap them without the start-up and pickling costs of worker processes. An augmented view
    seeds the global RNGs per image, so seeding and transforming hold a lock: same image, view and seed → same pixels.

    ``then`` (batch → result, releasing the GIL: a one-thread ONNX Runtime session) runs on the thread that decoded
    the batch, and ``batch`` is its result: ``workers + 1`` threads, one pipeline per core, each decoding and running
    its own batches. Decode threads feeding a forward pass spread over every core oversubscribe them (the pass's
    threads wait on one another whenever a decode takes a core): ants/bees' extraction took 12 % longer that way on
    2 cores; clothing's small photos, whose forward pass dominates, about the same.
    """
    workers = default_workers() if workers < 0 else workers
    min_size = decode_size(data_config)
    to_pixels = transform or pixel_transform(data_config)
    lock = threading.Lock()

    def one(i: int):
        try:
            img = open_rgb(paths[i], min_size)
            if seeds is None:
                return to_pixels(img), ""
            with lock:
                transforms.seed(seeds[i])
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
        if then is not None and stacked is not None:
            stacked = then(stacked)
        return [i for i, _ in good], stacked, [(i, err) for i, x, err in items if x is None]

    chunks = [list(range(k, min(k + batch_size, len(paths)))) for k in range(0, len(paths), batch_size)]
    threads = workers + 1 if then is not None else workers
    # a pool needs a second pipeline (with ``then``) or a decode worker to overlap; one batch has nothing to overlap
    # with: a thread would only cost its start (~5 ms)
    if threads < (2 if then is not None else 1) or len(chunks) == 1:
        yield from map(batch, chunks)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        ahead: deque = deque()
        for c in chunks:
            ahead.append(pool.submit(batch, c))
            if len(ahead) > threads + 1:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()


def _torch_stack(tensors: list):
    import torch

    return torch.stack(tensors)


def normalized_batches(paths: Sequence[Path], data_config: dict[str, Any], batch_size: int = 32, workers: int = -1):
    """``decoded_batches`` as normalised float32 NCHW arrays: the deployed (exported) graph's input format."""
    import torch

    for idx, pixels, bad in decoded_batches(list(paths), data_config, batch_size, workers):
        x = None if pixels is None else np.ascontiguousarray(normalize(torch.from_numpy(pixels), data_config).numpy())
        yield idx, x, bad


# ----------------------------------------------------------------------------------------------- cache


def cache_key(lb: LoadedBackbone, precision: str, view: tuple | None = None, device: str = "cpu", runtime: str = "pytorch",
              output: str = "embedding", graph: str | None = None) -> str:
    """Everything that changes an embedding, and nothing else (``graph``: the int8 graph, which its calibration shapes)."""
    desc = {
        **({"graph": graph} if graph else {}),
        **({"device": device} if device != "cpu" else {}),  # GPU kernels round differently; CPU keys unchanged
        **({"runtime": runtime} if runtime != "pytorch" else {}),
        **({"output": output} if output != "embedding" else {}),
        "view": view,
        "timm": lb.spec.timm_name,
        "kwargs": lb.spec.kwargs,
        "weights": lb.digest,
        "preprocess": lb.data_config,
        "precision": precision,
    }
    return cache.key(desc, length=20)


def file_digest(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _load_vector(path: Path) -> np.ndarray:
    return np.load(path, allow_pickle=False)  # a pickle planted in the cache is refused, never run


def _save_vector(vector: np.ndarray) -> Any:
    def write(path: Path) -> None:
        with open(path, "wb") as f:
            np.save(f, np.ascontiguousarray(vector, dtype=np.float32), allow_pickle=False)
    return write


# ---------------------------------------------------------------------------------------- int8 calibration


def calibration_sample(paths: Sequence[Path], labels: Sequence[int] | None = None, n: int | None = None,
                       seed: int = 0) -> onnx.Calibration:
    """Up to ``n`` of ``paths`` (the training photos) to calibrate an int8 graph on, taken in turn from each class.

    Within a class the photos are ordered by a seeded hash of their file name, not drawn by position, so adding a
    photo to the folder changes the sample (hence the graph and every int8 embedding) only if it ranks among the
    first few. Only the chosen photos are read (for their content digests); unreadable files stay in (decoding
    skips them) and files that cannot be opened are left out.
    """
    labels = list(labels) if labels is not None else [0] * len(paths)
    rank = {p: cache.key(seed, Path(p).name, str(p)) for p in paths}
    by_class = [sorted((p for p, y in zip(paths, labels) if y == c), key=rank.__getitem__) for c in sorted(set(labels))]
    chosen = [p for row in itertools.zip_longest(*by_class) for p in row if p is not None][:n or CALIBRATION_PHOTOS]
    pairs = [(Path(p), file_digest(Path(p))) for p in chosen]
    return onnx.Calibration(tuple(d for _, d in pairs if d), tuple(p for p, d in pairs if d))


def calibration_batches(calibration: onnx.Calibration, data_config: dict[str, Any], workers: int = -1) -> Iterator[np.ndarray]:
    """The calibration photos as the graph sees them (uint8 pixels, the run's resize and crop); unreadable ones skipped."""
    return (b for _, b, _ in decoded_batches(list(calibration.paths), data_config, ORT_BATCH, workers) if b is not None)


# -------------------------------------------------------------------------------------------- extract


@dataclass
class _Job:
    """One extraction: what to compute, with what, and what the cache already holds."""

    paths: Sequence[Path]
    lb: LoadedBackbone
    digests: list[str | None]
    runtime: str
    precision: str
    view_key: tuple | None
    output: str
    calibration: onnx.Calibration | None = None
    graph: str | None = None  # the int8 graph's key, once int8 is settled on
    looked: str = ""  # the runtime the cache was last looked up for
    store: cache.Store | None = None
    vectors: list[np.ndarray | None] = field(default_factory=list)
    todo: list[int] = field(default_factory=list)
    width: int = 0

    def lookup(self, cache_dir: str | os.PathLike | None, use_cache: bool) -> None:
        """The store for this runtime, the vectors it holds for ``paths`` and the indices it lacks."""
        prec, self.looked = self.resolved(), self.runtime
        self.graph = onnx.int8_key(self.lb, self.calibration) if prec == "int8" and self.calibration else None
        key = cache_key(self.lb, prec, self.view_key, distributed.device_type(), self.runtime, self.output, self.graph)
        self.store = cache.store(f"features/{key}", cache_dir, sharded=True) if use_cache else None
        hits = [self.store.read(d, ".npy", _load_vector) if self.store and d else None for d in self.digests]
        self.vectors = [h if h is not None and h.shape == (self.width,) else None for h in hits]
        self.todo = [i for i, v in enumerate(self.vectors) if v is None]

    def relookup(self, cache_dir: str | os.PathLike | None, use_cache: bool) -> None:
        """Look up again if building the forward changed what computes the embeddings (int8 or the export failed,
        logged): those are other embeddings, cached under another key."""
        if self.runtime != self.looked or (self.graph and self.calibration is None):
            self.lookup(cache_dir, use_cache)

    def resolved(self) -> str:
        """The precision the embeddings are computed at: int8 only by ONNX Runtime, on embeddings, with photos
        to calibrate on."""
        if self.runtime != "onnxruntime":
            return resolve_precision(self.precision)
        usable = self.output == "embedding" and self.calibration is not None
        return "int8" if ort_precision(self.precision) == "int8" and usable else "fp32"


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
    output: str = "embedding",
    calibration: onnx.Calibration | None = None,
) -> Features:
    """Embeddings of ``paths`` (cached ones read back, the rest computed in batches and cached).

    With ``augment_policy``, the embeddings of augmented view number ``view`` of each image (deterministic in image
    content, view and seed, hence cacheable like any other embedding). ``output="logits"``: the ImageNet
    classifier's logits instead (``predict --imagenet``), through the same runtime choice.

    ``precision="int8"`` (ONNX Runtime on a CPU) runs the backbone quantized, calibrated on ``calibration`` (the
    training photos, ``calibration_sample``; without it, on a sample of ``paths`` themselves); ``auto`` runs int8
    only when given a calibration and ``ORT_AUTO`` says so. Where int8 cannot be had, fp32 runs (logged).
    """
    start = time.perf_counter()
    runtime = resolve_runtime(runtime, precision, distributed.device_type(), augmented=bool(augment_policy))
    if runtime == "onnxruntime" and onnx.refused(lb, cache_dir, output):
        runtime = "pytorch"
    if calibration is None and precision == "int8" and runtime == "onnxruntime":
        calibration = calibration_sample(paths, seed=seed)  # asked for int8 with no training photos: these photos
    job = _Job(paths, lb, [file_digest(Path(p)) for p in paths] if use_cache else [None] * len(paths), runtime, precision,
               (augment_policy, view, seed) if augment_policy else None, output, calibration,
               width=lb.num_features if output == "embedding" else lb.num_classes)
    # The cache is read before anything is built: a run it answers in full needs neither the backbone nor a runtime.
    job.lookup(cache_dir, use_cache)
    reasons: dict[int, str] = {}
    if job.todo:
        forward, batch_size, lanes = _forward(job, cache_dir, batch_size, workers)
        job.relookup(cache_dir, use_cache)
        reasons = _compute(job, forward, batch_size, workers, progress, augment_policy, view, seed, lanes)
    ok = np.array([v is not None for v in job.vectors], dtype=bool)
    x = np.stack([v for v in job.vectors if v is not None]).astype(np.float32) if ok.any() else np.zeros((0, job.width), np.float32)
    skipped = [Skipped(shown_path(paths[i], root), reasons.get(i, "cannot decode")) for i in np.flatnonzero(~ok)]
    return Features(x, ok, skipped, computed=len(job.todo) - len(reasons), seconds=time.perf_counter() - start, runtime=job.runtime,
                    precision=job.resolved(), calibration=job.calibration.digests if job.graph and job.calibration else (),
                    digests=list(job.digests))


def _forward(job: _Job, cache_dir: str | os.PathLike | None, batch_size: int,
             workers: int) -> tuple[Callable[[Any], np.ndarray], int, int]:
    """The batch → vectors function of the job's runtime (ONNX Runtime, or PyTorch where its export is refused),
    its batch size, and how many threads run it (``decoded_batches``' ``then``), each decoding its own batches; 0:
    decode threads feed it on the calling thread. ONNX Runtime with more than one batch to run gets a thread per
    core (``workers + 1`` when given), each session call then on its one thread."""
    ort_batch = min(batch_size, ORT_BATCH)
    cores = distributed.cores() if workers < 0 else workers + 1
    lanes = cores if len(job.todo) > ort_batch and cores > 1 else 0
    threads = 1 if lanes else 0
    if job.graph and job.calibration:
        calib, lb = job.calibration, job.lb
        session = onnx.int8_session(lb, calib, lambda: calibration_batches(calib, lb.data_config, workers), cache_dir, threads)
        if session is not None:
            return (lambda b: session.run(None, {"pixels": b})[0]), ort_batch, lanes
        job.calibration = None  # int8 cannot be had (logged): fp32 embeddings instead
    if job.runtime == "onnxruntime":
        session = onnx.feature_session(job.lb, cache_dir, job.output, threads)
        if session is not None:
            return (lambda b: session.run(None, {"pixels": b})[0]), ort_batch, lanes
        job.runtime = "pytorch"
    dev, prec = distributed.device(), resolve_precision(job.precision)
    model = prepare(job.lb.model).to(dev)
    return (lambda b: embed(model, b, prec, job.lb.data_config, job.output).numpy()), batch_size, 0


def _compute(job: _Job, forward: Callable[[Any], np.ndarray], batch_size: int, workers: int, progress: bool,
             augment_policy: str | None, view: int, seed: int, lanes: int = 0) -> dict[int, str]:
    """Run the missing images through ``forward``, caching each vector; returns why each unreadable one failed.
    ``lanes`` threads each decode and run their own batches (``_forward``); 0: ``workers`` decode threads feed
    ``forward`` here."""
    transform = seeds = None
    if augment_policy:
        transform = transforms.train_transform(job.lb.data_config, augment_policy)
        seeds = [(int(job.digests[i][:15], 16) if job.digests[i] else i) + 7919 * view + 104_729 * seed for i in job.todo]
    reasons: dict[int, str] = {}
    bar = tqdm(total=len(job.todo), desc=f"features {job.lb.spec.name}", unit="img", disable=not progress, leave=False)
    for idx, batch, bad in decoded_batches([job.paths[i] for i in job.todo], job.lb.data_config, batch_size,
                                           lanes - 1 if lanes else workers, transform, seeds, then=forward if lanes else None):
        for j, err in bad:
            reasons[job.todo[j]] = err
        if batch is not None:
            for j, vec in zip(idx, batch if lanes else forward(batch)):
                i = job.todo[j]
                job.vectors[i] = vec
                if job.store is not None and job.digests[i]:
                    job.store.write(job.digests[i], {".npy": _save_vector(vec)})
        bar.update(len(idx) + len(bad))
    bar.close()
    if job.runtime == "pytorch":
        job.lb.model.to("cpu")  # the rest of the pipeline (head, bundle) expects the backbone on the CPU
    return reasons


# ------------------------------------------------------------------------------------------ runtime choice


def resolve_runtime(runtime: str = "auto", precision: str = "auto", device_type: str = "cpu", augmented: bool = False) -> str:
    """What runs the backbone. ``auto``: ONNX Runtime (fp32 or int8) on a CPU, PyTorch on a GPU, for augmented
    views (their random transforms produce float tensors; int8 runs them in fp32) and when bf16 is asked for."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if precision == "int8" and (runtime == "pytorch" or device_type != "cpu"):
        raise ValueError("precision int8 runs the backbone in ONNX Runtime on the CPU: give runtime auto or onnxruntime "
                         "without a GPU, or precision auto/fp32/bf16")
    if runtime == "pytorch" or augmented:
        return "pytorch"
    usable = device_type == "cpu" and precision != "bf16"
    if runtime == "onnxruntime" and not usable:
        raise ValueError("the onnxruntime runtime runs fp32 on the CPU: use precision auto/fp32 without a GPU, or runtime pytorch")
    return "onnxruntime" if usable else "pytorch"


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
    digests: list[str | None] = [None] * n
    for k, part in enumerate(distributed.all_gather(mine)):
        idx = np.arange(k, n, w)
        ok[idx] = part.ok
        for i, dg in zip(idx.tolist(), part.digests):
            digests[i] = dg
        rows.update(zip(idx[part.ok].tolist(), part.x))
        skipped.update(zip(idx[~part.ok].tolist(), part.skipped))
        computed, seconds = computed + part.computed, max(seconds, part.seconds)
    x = np.stack([rows[i] for i in np.flatnonzero(ok)]) if ok.any() else np.zeros((0, lb.num_features), np.float32)
    return Features(x, ok, [skipped[i] for i in sorted(skipped)], computed=computed, seconds=seconds, runtime=mine.runtime,
                    precision=mine.precision, calibration=mine.calibration, digests=digests)


def shown_path(path: Path, root: Path | None) -> str:
    if root is not None:
        with contextlib.suppress(ValueError):
            return str(Path(path).relative_to(root))
    return str(path)
