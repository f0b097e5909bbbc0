"""PyTorch vs ONNX Runtime on this CPU: single-image latency and batch-32 throughput, same run, same inputs.

    python benchmarks/export_bench.py [RUN] [--reps 5]

Without RUN, trains the default backbone on the shared ants/bees photos (features cached) and exports it.
Photos are decoded and transformed once up front: the numbers are the model's forward pass, which is what
the engine choice changes. The engines are timed in alternation, repetition by repetition, so a busy
machine slows both alike. Writes the "onnx" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from common import machine, write_section

import headstart
from headstart import export, features, predict
from headstart.config import shared_dir

HEADING = "## PyTorch vs ONNX Runtime"


def timed(fn, reps: int) -> float:
    """Median seconds of ``reps`` calls."""
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", nargs="?", type=Path)
    ap.add_argument("--reps", type=int, default=5, help="repetitions per measurement (median reported)")
    args = ap.parse_args()
    data = shared_dir() / "datasets" / "hymenoptera"
    run = args.run
    if run is None:
        run = Path(tempfile.mkdtemp()) / "ants"
        headstart.train(data, out=run, progress=False)
    if not (run / export.ONNX_FILE).is_file():
        export.export_onnx(run)
    clf = headstart.load(run)
    predict.open_for(clf)  # refuses an export that no longer matches the run
    paths = headstart.scan(data).splits["val"].paths[:32]
    x = np.concatenate([b for _, b, _ in features.normalized_batches(paths, clf.backbone.data_config) if b is not None])
    assert len(x) == 32
    precision = features.resolve_precision(clf.info.get("precision", "auto"))
    model = features.prepare(clf.backbone.model)  # the PyTorch engine exactly as predict runs it
    default_threads = torch.get_num_threads()

    def torch_forward(batch: np.ndarray, prec: str, threads: int):
        torch.set_num_threads(threads)
        emb = features.embed(model, torch.from_numpy(batch), prec)
        return clf.proba_from_features(emb.numpy())

    def ort_session(threads: int):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        session = ort.InferenceSession(str(run / export.ONNX_FILE), opts, providers=["CPUExecutionProvider"])
        return lambda b: session.run(None, {"image": b})[0]

    engines = {}
    for threads in sorted({1, default_threads}):
        engines[("PyTorch fp32", threads)] = lambda b, t=threads: torch_forward(b, "fp32", t)
        if precision != "fp32":
            engines[(f"PyTorch {precision}", threads)] = lambda b, t=threads: torch_forward(b, precision, t)
        engines[("ONNX Runtime fp32", threads)] = ort_session(threads)
    for fn in engines.values():  # warm-up: oneDNN primitive caches, ORT's first-run allocations
        fn(x[:1]), fn(x)

    single = {k: [] for k in engines}
    batch = {k: [] for k in engines}
    for _ in range(args.reps):  # alternate engines so background load hits them alike
        for key, fn in engines.items():
            single[key].append(timed(lambda: fn(x[:1]), 3))
            batch[key].append(timed(lambda: fn(x), 1))
    reference = next(iter(engines.values()))(x).argmax(1)
    agree = {name: float((fn(x).argmax(1) == reference).mean()) for (name, t), fn in engines.items() if t == 1}

    rows = []
    for (name, threads) in engines:
        lat = statistics.median(single[(name, threads)]) * 1e3
        thr = 32 / statistics.median(batch[(name, threads)])
        rows.append(f"| {name} | {threads} | {lat:.1f} | {thr:.1f} |")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    section = "\n".join([
        HEADING,
        "",
        f"`python benchmarks/export_bench.py` — backbone `{clf.backbone.spec.name}`, {x.shape[-1]} px, head `{clf.info['head']['kind']}`; "
        f"{machine()}; onnxruntime {ort.__version__}. Forward pass only (photos decoded beforehand), median of {args.reps} alternating "
        f"repetitions; 1-minute load average at the end: {load:.1f} (the machine is shared, so absolute numbers are noisy; the "
        "engines ran interleaved in the same run and are comparable with each other).",
        "",
        "| engine | threads | single image, ms | batch 32, images/s |",
        "|---|---:|---:|---:|",
        *rows,
        "",
        f"Threads: {default_threads} is each engine's default here; with other jobs on the cores, several threads per "
        "process mostly wait on each other, so the 1-thread rows are the steadier comparison. Top-1 on these 32 photos "
        "agrees with PyTorch fp32: " + ", ".join(f"{k} {v:.0%}" for k, v in agree.items()) + ". ONNX Runtime runs fp32; "
        "export refuses a graph whose probabilities differ from PyTorch fp32 by more than 1e-4.",
        "",
    ])
    write_section("onnx", section)
    print(section)


if __name__ == "__main__":
    sys.exit(main())
