"""The head's cross-validated search on 3 000 photos' embeddings: how long, and what each speed-up changed.

    python benchmarks/head_search.py

The clothing set's 1 439 embeddings (default backbone, read from the feature cache after a first run) tiled to 3 000
rows with seeded noise (0.3 of each feature's spread), 10 classes: the size of the scaling benchmark's largest
folder, without its extraction. Each variant runs ``heads.select`` (5-fold CV of the MLP and of the logistic
regression at two strengths) and the final fit, median of 3; the table says whether the outcome moved. Writes the
``head-search`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import os
import dataclasses
import statistics
import time
from unittest import mock

import numpy as np
from common import machine, shared, write_section

from headstart import features, heads, pipeline
from headstart.config import TrainConfig
from headstart.data import scan

REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


def memory(x: np.ndarray, y: np.ndarray, n: int = 40_000) -> float:
    """The search and fit's peak allocations (tracemalloc: numpy reports its arrays to it) beside ``n`` rows tiled
    from ``x`` with noise, in multiples of those rows' bytes: what a large folder needs on top of its embeddings."""
    import tempfile
    import tracemalloc

    rng = np.random.default_rng(1)
    idx = rng.integers(0, len(x), n)
    big, sd = x[idx], 0.3 * x.std(0)
    for k in range(0, n, 5000):
        big[k:k + 5000] += rng.standard_normal((len(big[k:k + 5000]), x.shape[1]), dtype=np.float32) * sd
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        with tempfile.TemporaryDirectory() as cache:
            heads.fit(big, y[idx], 10, TrainConfig(cache_dir=cache))
        return (tracemalloc.get_traced_memory()[1] - base) / big.nbytes
    finally:
        tracemalloc.stop()


def rows_3000() -> tuple[np.ndarray, np.ndarray]:
    data = shared() / "datasets" / "clothing"
    lb = pipeline.load_backbone(TrainConfig())
    ds = scan(data)
    xs, ys = [], []
    for split in ds.splits.values():
        f = features.extract(split.paths, lb, progress=False)
        xs.append(f.x)
        ys.append(np.asarray(split.labels)[f.ok])
    x, y = np.concatenate(xs), np.concatenate(ys)
    rng = np.random.default_rng(0)
    idx = rng.choice(len(x), 3000 - len(x))
    noise = rng.normal(0, 0.3, (len(idx), x.shape[1])).astype(np.float32) * x.std(0)
    return np.concatenate([x, x[idx] + noise]).astype(np.float32), np.concatenate([y, y[idx]])


def timed(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, one_core: bool, path: bool, warm: bool) -> tuple[float, tuple]:
    cold = {"linear": dataclasses.replace(heads.HEADS["linear"], fit_grid=None)}  # each C fitted from zero
    times, outcome = [], None
    for _ in range(REPEAT):
        with heads.single_thread(), mock.patch.object(heads.distributed, "cores", (lambda: 1) if one_core else heads.distributed.cores), \
                mock.patch.dict(heads.HEADS, {} if path else cold):
            t = time.perf_counter()
            kind, params, epochs, table, start = heads.select(x, y, 10, cfg)
            heads.HEADS[kind].fit(heads.FitData(x, y, 10, start=start if warm else None), cfg, params,
                                  max(epochs, 1) if heads.HEADS[kind].iterative else None)
            times.append(time.perf_counter() - t)
        outcome = (kind, params, epochs, [(r["kind"], r["params"], round(r["cv_accuracy"], 4), r["epochs"]) for r in table])
    return statistics.median(times), outcome


def described(out: tuple) -> str:
    kind, params, _, table = out
    return f"{kind} {params.get('C', '')}; " + ", ".join(f"{k}{p.get('C', '')} {100 * a:.2f} %" for k, p, a, _ in table)


def main() -> None:
    x, y = rows_3000()
    heads.select(x[:200], y[:200], 10, TrainConfig())  # scikit-learn's import, paid once outside the timings
    load0 = os.getloadavg()
    patient = {"patience": 15, "overfit_stop": 1e9, "cv_folds": 5}
    variants = [("before: one core, patience 15 only, each C fitted from zero", TrainConfig(**patient), True, False, False),
                ("fold fits on every core (threads)", TrainConfig(**patient), False, False, False),
                ("+ an MLP fit stops at 10 % above its best held-out loss", TrainConfig(patience=15, cv_folds=5), False, False, False),
                ("+ the linear head's C values on one warm-started path per fold", TrainConfig(patience=15, cv_folds=5), False, True, False),
                ("+ patience 5 instead of 15", TrainConfig(cv_folds=5), False, True, False),
                ("+ the final linear fit starts from the folds' solutions", TrainConfig(cv_folds=5), False, True, True),
                ("+ 3 folds instead of 5 from 2 000 training photos (the defaults)", TrainConfig(), False, True, True)]
    results = [(name, *timed(x, y, cfg, one, path, warm)) for name, cfg, one, path, warm in variants]
    peak = memory(x, y)
    lines = [f"| {name} | **{t:.1f} s** | {described(out)} |" for name, t, out in results]
    body = f"""## The head's search at 3 000 photos (`python benchmarks/head_search.py`)

Machine: {machine()}; load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. The clothing set's embeddings
(default backbone) tiled to 3 000 rows × 1 280 features with seeded noise; `heads.select` (cross-validation of
the MLP and of the logistic regression at C 0.05 and 0.5; 5 folds in every row but the last) plus the final fit,
median of {REPEAT}; every row runs today's code (the fused Adam included) with the settings named.

| search | time | choice; CV accuracy of each candidate |
|---|---:|---|
{chr(10).join(lines)}

The goal was 2 s; {'met' if results[-1][1] <= 2 else 'not met'} on this machine. The last row is `cv_folds="auto"`: from 2 000 training
photos the search runs 3 folds instead of 5. Every photo is still held out exactly once, so the accuracy estimate
rests on all 3 000; each fit sees two thirds of them instead of four fifths, and there are 3 fits of each head
instead of 5, so the search's arithmetic halves. (On these tiled rows 3 folds score every candidate lower, since
fewer of a held-out row's noisy twins are in its fold's training part; the two shared sets have fewer than
2 000 training photos, so their searches did not change.) On 2 cores the three MLP folds set the pace: two of
them run one after the other on one core while the other core takes the third and the linear fits. Patience 5 gave the same cross-validation table as 15 on both shared sets (ants/bees and clothing
training splits, default backbone) and here: each fold's held-out loss bottoms out at epoch 5-8 and then wanders
within a few per cent, so the extra 10 epochs only confirmed the best one. The warm-started path fits C 0.05 from
zero and C 0.5 from its answer (6 L-BFGS iterations instead of 21); the same optimum to the solver's tolerance, so a
held-out photo or two can change sides (the C 0.5 row). The final fit, which runs alone on one core once the search
is over, starts from the chosen C's five fold solutions, each moved into the final rows' standardisation and averaged:
12 L-BFGS iterations instead of 45 to the same optimum. What is left is arithmetic: an MLP epoch on a fold
of 2 000 rows is 2.6 GFLOP of matrix products (1 280 → 256, forward and the first layer's gradient) plus Adam's
12 passes over 330 000 weights after each of 32 batches. Measured on this Xeon, one core: 65-80 GFLOP/s in those
products, 1.7 ms an Adam step (each pass over a 1.3 MB array runs at 10-20 GB/s; the AMD EPYC did one in 0.5 ms),
about 3.5 ms a batch in all and 1.4 s a fold (11 epochs); Adam in L2-sized chunks of 16-128 k weights gave the same
1.45-1.5 s. Two fits side by side each run at full speed, so the three MLP folds and the linear ones split over the
two cores as 2 MLP folds (2.8 s) against 1 MLP fold and 3 linear ones (2.5 s). On the AMD EPYC where the 2 s goal
was set, the row above this one took 2.3 s (2026-12-02); the same 0.6× would put it near 1.4 s there, a
projection, not a measurement.
Memory: at its peak the search and fit hold {peak:.1f}× the embeddings' bytes beside them (40 000 rows tiled the same
way, tracemalloc), down from 5.5× before the fold fits stopped making two temporaries and the MLP a standardised
copy of its rows (it standardises each batch as it draws it, the same numbers to the bit): each thread's fold copy,
and scikit-learn's float64 copy for the logistic regression, are what is left. Tried and not kept: the MLP on 64-256 principal components (5× fewer products, but CV accuracy fell by 1-50
points: whitening the components amplified noise), Adam in cache-sized chunks (no faster), patience 3 (changed
clothing's MLP row: 85.7 → 85.5 %), an L-BFGS of our own in float32 (no faster than scikit-learn's: each iteration is
two passes over the rows, bound by memory either way).
"""
    write_section("head-search", body)
    print(body)


if __name__ == "__main__":
    main()
