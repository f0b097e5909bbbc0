"""Regenerate the core and fine-tuning sections of BENCHMARKS.md.

    python benchmarks/run.py [core] [finetune]      (no argument: both; `make bench` runs every benchmark script)

Medians of 3 runs unless a line says otherwise. Run on an otherwise idle machine.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

from common import machine, median_time, run_cli, shared, write_section


def bare_forward(name: str = "tf_efficientnet_lite0", batch: int = 32, repeat: int = 5) -> dict[str, float]:
    """Model-only throughput (random input): the ceiling the extraction pipeline approaches."""
    import timm
    import torch

    from headstart.features import autocast, bf16_supported

    out = {}
    model = timm.create_model(name, num_classes=0).eval()
    x = torch.randn(batch, 3, 224, 224)
    variants = [("fp32 eager", False, "fp32"), ("fp32 channels_last", True, "fp32")]
    if bf16_supported():
        variants.append(("bf16 channels_last", True, "bf16"))
    for label, cl, prec in variants:
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x.contiguous()

        def step() -> None:
            with torch.inference_mode(), autocast(prec):
                m(xi)

        step()
        step()
        t, _ = median_time(step, repeat)
        out[label] = batch / t
    return out


def extraction_throughput(precision: str) -> float:
    from headstart import backbones, features
    from headstart.data import scan

    ds = scan(shared() / "datasets" / "hymenoptera")
    paths = ds.splits["train"].paths + ds.splits["val"].paths
    lb = backbones.load()
    features.extract(paths[:32], lb, use_cache=False, precision=precision, progress=False)  # warm-up
    t, _ = median_time(lambda: features.extract(paths, lb, use_cache=False, precision=precision, progress=False), 3)
    return len(paths) / t


def head_accuracy(data: str, precision: str) -> float:
    import headstart

    with tempfile.TemporaryDirectory() as cache:
        clf = headstart.train(shared() / "datasets" / data, precision=precision, cache_dir=cache, progress=False)
    return clf.info["metrics"]["val"]["accuracy"]


def core() -> None:
    hym = str(shared() / "datasets" / "hymenoptera")
    firsts, cached = [], []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
            env = {"HEADSTART_CACHE": cache}
            firsts.append(run_cli(["train", hym, "--out", f"{out}/a", "--quiet"], env))
            cached.append(run_cli(["train", hym, "--out", f"{out}/b", "--quiet"], env))
    import statistics

    bare = bare_forward()
    e2e = {p: extraction_throughput(p) for p in (["fp32", "bf16"] if "bf16 channels_last" in bare else ["fp32"])}
    acc = {(d, p): head_accuracy(d, p) for d in ("hymenoptera", "clothing") for p in e2e}
    rows = [f"| {label} | {v:.0f} img/s |" for label, v in bare.items()]
    best = max(e2e.values())
    body = f"""## Core: `headstart train` on ants/bees, extraction speed, bf16 accuracy

Machine: {machine()}. Command: `python benchmarks/run.py core`.

| what | median of 3 | runs |
|---|---|---|
| `headstart train hymenoptera` (398 photos), empty cache | **{statistics.median(firsts):.1f} s** | {', '.join(f'{t:.1f}' for t in firsts)} |
| same command again, warm cache (0 embeddings computed) | **{statistics.median(cached):.1f} s** | {', '.join(f'{t:.1f}' for t in cached)} |

Wall time of the whole CLI process (Python start-up and imports included). Goals: first run ≤ 15 s, cached ≤ 5 s.

Bare timm forward, `tf_efficientnet_lite0`, batch 32, 224 px, {os.cpu_count()} threads, random input:

| variant | throughput |
|---|---|
{chr(10).join(rows)}

End-to-end extraction in headstart (decode + resize + crop + forward, 398 real photos, no cache):

| precision | throughput | vs bare fp32 eager |
|---|---|---|
{chr(10).join(f'| {p} | {v:.0f} img/s | {v / bare["fp32 eager"]:.2f}× |' for p, v in e2e.items())}

Accuracy of the default head on features of each precision (val split; bf16 is used only if it stays within 0.5 points):

| data set | {' | '.join(e2e)} |
|---|{'---|' * len(e2e)}
{chr(10).join(f"| {d} | {' | '.join(f'{100 * acc[(d, p)]:.1f} %' for p in e2e)} |" for d in ("hymenoptera", "clothing"))}

Best end-to-end: {best:.0f} img/s.
"""
    write_section("core", body)
    print(body)


def finetune() -> None:
    import headstart

    hym = shared() / "datasets" / "hymenoptera"
    variants = [
        ("all on: channels_last + bf16 autocast + decode worker", {}),
        ("fp32 (no bf16 autocast)", {"precision": "fp32"}),
        ("no channels_last", {"channels_last": False}),
        ("no decode worker (workers=0)", {"workers": 0}),
    ]
    rows = []
    for label, kw in variants:
        with tempfile.TemporaryDirectory() as cache:
            clf = headstart.train(hym, finetune=True, ft_epochs=2, ft_patience=99, cache_dir=cache, progress=False, **kw)
        per_epoch = [r["seconds"] for r in clf.info["history"] if r["stage"] == "finetune" and r["epoch"] > 0]
        rows.append(f"| {label} | {min(per_epoch):.1f} s | {clf.info['metrics']['val']['accuracy']:.3f} |")
    full = {}
    for data in os.environ.get("BENCH_FT_DATA", "hymenoptera,clothing").split(","):
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as cache:
            clf = headstart.train(shared() / "datasets" / data, finetune=True, cache_dir=cache, progress=False)
        st = clf.info["stages"]
        full[data] = (time.perf_counter() - t, st["feature_extraction"]["val"]["accuracy"], st["finetune"]["val"]["accuracy"],
                      st["finetune"]["epochs_run"])
    body = f"""## Fine-tuning: time per epoch with each speed option, and what it buys

Machine: {machine()}. Command: `python benchmarks/run.py finetune`.

Per-epoch time (245 training + 153 validation photos, default backbone, top 3 blocks unfrozen; best of 2 epochs):

| speed options | seconds / epoch | val accuracy after 2 epochs |
|---|---|---|
{chr(10).join(rows)}

Whole run with defaults (`headstart train DATA --finetune`, empty cache; extraction + head + fine-tuning + evaluation):

| data set | wall time | feature extraction (val) | fine-tuned (val) | epochs |
|---|---|---|---|---|
{chr(10).join(f'| {d} | {t:.0f} s | {100 * a:.1f} % | {100 * b:.1f} % | {n} |' for d, (t, a, b, n) in full.items())}
"""
    write_section("finetune", body)
    print(body)


if __name__ == "__main__":
    wanted = sys.argv[1:] or ["core", "finetune"]
    for name in wanted:
        {"core": core, "finetune": finetune}[name]()
