"""Regenerate the core and fine-tuning sections of BENCHMARKS.md.

    python benchmarks/run.py [core] [finetune] [input_size] [crop] [ensemble]   (no argument: all; `make bench` runs every benchmark script)

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
    import io
    import warnings

    import numpy as np
    import onnxruntime as ort
    import timm
    import torch

    from headstart.features import autocast, bf16_supported

    out = {}
    model = timm.create_model(name, num_classes=0).eval()
    x = torch.randn(batch, 3, 224, 224)
    variants = [("PyTorch fp32 eager", False, "fp32"), ("PyTorch fp32 channels_last", True, "fp32")]
    if bf16_supported():
        variants.append(("PyTorch bf16 autocast + channels_last", True, "bf16"))
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
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.to(memory_format=torch.contiguous_format), (x[:1],), buf, dynamo=False, opset_version=17,
                          input_names=["x"], dynamic_axes={"x": {0: "n"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for b in (batch, 8):
        xb = np.ascontiguousarray(x[:b].numpy())
        session.run(None, {"x": xb})
        t, _ = median_time(lambda: session.run(None, {"x": xb}), repeat)
        out[f"ONNX Runtime fp32, batch {b}"] = b / t
    return out


RUNTIMES = {  # label -> extract() settings
    "ONNX Runtime fp32 (default)": {"runtime": "auto", "precision": "auto"},
    "PyTorch fp32 + channels_last": {"runtime": "pytorch", "precision": "fp32"},
    "PyTorch bf16 + channels_last": {"runtime": "pytorch", "precision": "bf16"},
}


def extraction_throughput(settings: dict[str, str]) -> float:
    from headstart import backbones, features
    from headstart.data import scan

    ds = scan(shared() / "datasets" / "hymenoptera")
    paths = ds.splits["train"].paths + ds.splits["val"].paths
    lb = backbones.load()
    features.extract(paths[:32], lb, use_cache=False, progress=False, **settings)  # warm-up (and the one-off ONNX export)
    t, _ = median_time(lambda: features.extract(paths, lb, use_cache=False, progress=False, **settings), 3)
    return len(paths) / t


def head_accuracy(data: str, settings: dict[str, str]) -> float:
    import headstart

    with tempfile.TemporaryDirectory() as cache:
        clf = headstart.train(shared() / "datasets" / data, cache_dir=cache, progress=False, **settings)
    return clf.info["metrics"]["val"]["accuracy"]


def core() -> None:
    import statistics
    import subprocess

    from headstart.features import bf16_supported

    hym = str(shared() / "datasets" / "hymenoptera")
    firsts, cached, other_head = [], [], []
    for _ in range(3):
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
            env = {"HEADSTART_CACHE": cache}
            firsts.append(run_cli(["train", hym, "--out", f"{out}/a", "--quiet"], env))
            cached.append(run_cli(["train", hym, "--out", f"{out}/b", "--quiet"], env))
            other_head.append(run_cli(["train", hym, "--out", f"{out}/c", "--quiet", "--head", "mlp"], env))
    imports, _ = median_time(lambda: subprocess.run([sys.executable, "-c", "import headstart.cli"], check=True), 3)
    timm_import, _ = median_time(lambda: subprocess.run([sys.executable, "-c", "import timm"], check=True), 3)

    bare = bare_forward()
    runtimes = {k: v for k, v in RUNTIMES.items() if v["precision"] != "bf16" or bf16_supported()}
    e2e = {label: extraction_throughput(kw) for label, kw in runtimes.items()}
    acc = {(d, label): head_accuracy(d, kw) for d in ("hymenoptera", "clothing") for label, kw in runtimes.items()}
    fp32 = bare["PyTorch fp32 eager"]
    body = f"""## Core: `headstart train` on ants/bees, extraction speed, accuracy per runtime

Machine: {machine()}. Command: `python benchmarks/run.py core`.

| what | median of 3 | runs |
|---|---|---|
| `headstart train hymenoptera` (398 photos), empty cache | **{statistics.median(firsts):.1f} s** | {', '.join(f'{t:.1f}' for t in firsts)} |
| same command again, warm cache (0 embeddings computed) | **{statistics.median(cached):.1f} s** | {', '.join(f'{t:.1f}' for t in cached)} |
| warm features, another head (`--head mlp`): head fitted, Grad-CAM drawn | {statistics.median(other_head):.1f} s | {', '.join(f'{t:.1f}' for t in other_head)} |
| `python -c "import headstart.cli"` | {imports:.1f} s | `import timm` (torch + torchvision + timm), which a cached run never does: {timm_import:.1f} s |

Wall time of the whole CLI process (Python start-up and imports included). Goals: first run ≤ 15 s, cached ≤ 5 s.
A cached run is answered by the cache in full: embeddings, the head's cross-validation and fit, the backbone's
preprocessing/digest and headless weights (for the bundle) and the Grad-CAM pictures of the report. It never
imports torch, timm or torchvision; what is left is importing scikit-learn and matplotlib, hashing the photos,
evaluating and writing the run folder (byte-identical to the first run's but for timings). Another head setting
re-fits the head (importing torch for the MLP) and draws Grad-CAM again (building the backbone).

Bare forward pass, `tf_efficientnet_lite0` without classifier, 224 px, {os.cpu_count()} threads, random input, batch 32
unless named:

| variant | throughput | vs PyTorch fp32 eager |
|---|---|---|
{chr(10).join(f"| {label} | {v:.0f} img/s | {v / fp32:.2f}× |" for label, v in bare.items())}

End-to-end extraction in headstart (decode + resize + crop + forward, 398 real photos, no cache, median of 3):

| runtime | throughput | vs bare PyTorch fp32 eager |
|---|---|---|
{chr(10).join(f"| {label} | {v:.0f} img/s | {v / fp32:.2f}× |" for label, v in e2e.items())}

Goal: end to end ≥ 3× bare fp32 eager. Validation accuracy of the default head on the features of each runtime:

| data set | {' | '.join(runtimes)} |
|---|{'---|' * len(runtimes)}
{chr(10).join(f"| {d} | {' | '.join(f'{100 * acc[(d, label)]:.1f} %' for label in runtimes)} |" for d in ("hymenoptera", "clothing"))}
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


def input_size() -> None:
    """Accuracy and extraction speed of the default backbone at several input sizes (``--input-size``)."""
    import headstart

    sizes = [224, 256, 288, 320]
    rows = []
    for size in sizes:
        cells = []
        with tempfile.TemporaryDirectory() as cache:
            for data in ("hymenoptera", "clothing"):
                clf = headstart.train(shared() / "datasets" / data, cache_dir=cache, progress=False, input_size=size)
                m, t = clf.info["metrics"], clf.info["timing"]
                cells += [f"{100 * m['val']['accuracy']:.1f} %"] + ([f"{100 * m['test']['accuracy']:.1f} %"] if "test" in m else [])
                if data == "hymenoptera":
                    speed = t["embeddings_computed"] / t["extract_s"]
        rows.append(f"| {size}{' (default)' if size == 224 else ''} | {' | '.join(cells)} | {speed:.0f} img/s |")
    body = f"""## Input size: accuracy and extraction speed of the default backbone (`--input-size`)

Machine: {machine()}. Command: `python benchmarks/run.py input_size`.

`headstart.train(DATA, input_size=N)` with an empty cache: EfficientNet-Lite0 (trained at 224 px) run at N×N, the
rest of timm's preprocessing unchanged, head chosen by cross-validation on train as usual. Extraction speed: the
ants/bees run's (ONNX Runtime, decode included; the first batch also pays the export at that size).

| input px | ants/bees val (153) | clothing val (225) | clothing test (214) | extraction |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}
"""
    write_section("input_size", body)
    print(body)


def crop() -> None:
    """Accuracy with timm's centre crop against the whole frame (``--crop-pct 1.0``), per Lite backbone."""
    import headstart

    rows = []
    for backbone in ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"):
        with tempfile.TemporaryDirectory() as cache:
            for crop_pct in (None, 1.0):
                cells = []
                for data in ("hymenoptera", "clothing"):
                    clf = headstart.train(shared() / "datasets" / data, cache_dir=cache, progress=False, backbone=backbone, crop_pct=crop_pct)
                    m = clf.info["metrics"]
                    cv = max(r["cv_accuracy"] for r in clf.info["head_selection"])
                    cells += [f"{100 * cv:.1f} %", f"{100 * m['val']['accuracy']:.1f} %"]
                    cells += [f"{100 * m['test']['accuracy']:.1f} %"] if "test" in m else []
                shown = f"{clf.backbone.data_config['crop_pct']:g}" + (" (timm's)" if crop_pct is None else "")
                rows.append(f"| {backbone} | {shown} | {' | '.join(cells)} |")
    body = f"""## Centre crop or whole frame (`--crop-pct`)

Machine: {machine()}. Command: `python benchmarks/run.py crop`.

`headstart.train(DATA, backbone=B, crop_pct=P)` with an empty cache, head chosen by cross-validation on train as
usual ("CV" is that cross-validated accuracy, on the training split only). timm's crop resizes the shorter side to
size / crop_pct and keeps the centre; 1.0 resizes it straight to the input size, so only the longer side is trimmed.

| backbone | crop_pct | ants/bees CV | ants/bees val (153) | clothing CV | clothing val (225) | clothing test (214) |
|---|---|---:|---:|---:|---:|---:|
{chr(10).join(rows)}
"""
    write_section("crop", body)
    print(body)


def ensemble() -> None:
    """Each Lite backbone alone (crop chosen by cross-validation on train) and the ensembles of them."""
    import headstart

    names = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
    combos = [(0,), (1,), (2,), (0, 1), (0, 1, 2)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        results: dict[str, list[str]] = {}
        for data in ("hymenoptera", "clothing"):
            t0 = time.perf_counter()
            runs = [headstart.train(shared() / "datasets" / data, out=f"{tmp}/{data}-{n}", cache_dir=tmp, progress=False, backbone=n,
                                    crop_pct="auto") for n in names]
            trained = time.perf_counter() - t0
            for combo in combos:
                model = runs[combo[0]] if len(combo) == 1 else headstart.ensemble.build([runs[i] for i in combo])
                m = model.info["metrics"]
                key = " + ".join(names[i].replace("efficientnet_", "") for i in combo)
                crops = ", ".join(f"{runs[i].backbone.data_config['crop_pct']:g}" for i in combo)
                cells = [f"{100 * m['val']['accuracy']:.1f} %"] + ([f"{100 * m['test']['accuracy']:.1f} %"] if "test" in m else [])
                results.setdefault(key, []).extend([crops, *cells])
            print(f"{data}: three runs trained in {trained:.0f} s")
        for key, cells in results.items():
            rows.append(f"| {key} | {' | '.join(cells)} |")
    body = f"""## Ensembles of backbones (`headstart ensemble`)

Machine: {machine()}. Command: `python benchmarks/run.py ensemble`.

Each Lite backbone trained with `crop_pct="auto"` (timm's centre crop or the whole frame, whichever
cross-validates better on the training photos) and its head chosen by cross-validation as usual, then
`headstart.ensemble.build` over the runs: the members' class probabilities averaged, measured on the same
validation and test photos. No choice here looks at those photos.

| backbones | ants/bees crop | ants/bees val (153) | clothing crop | clothing val (225) | clothing test (214) |
|---|---|---:|---|---:|---:|
{chr(10).join(rows)}
"""
    write_section("ensemble", body)
    print(body)


if __name__ == "__main__":
    wanted = sys.argv[1:] or ["core", "finetune", "input_size", "crop", "ensemble"]
    for name in wanted:
        {"core": core, "finetune": finetune, "input_size": input_size, "crop": crop, "ensemble": ensemble}[name]()
