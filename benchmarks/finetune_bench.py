"""Fine-tuning against the frozen head, per seed, with the default backbone on both shared sets; and lr-find.

    python benchmarks/finetune_bench.py [--data clothing,hymenoptera] [--seeds 0,1,2] [--auto] [--keep results.json]
                                        [--extra '{"ft_epochs": 3}']   (settings beside --finetune --cache-bottom)

Per set and seed: `headstart.train` without and with `finetune=True, cache_bottom=True` (and with `ft_lr="auto"`
under --auto), each run's validation (and test) accuracy, wall time (the head stage's features are cached first, so
the fine-tuning time is what --finetune adds plus a cached head stage) and what the held-out training photos decided.
Then `headstart lr-find` on each set draws docs/lr_find_<set>.png. Writes the "finetune" section of BENCHMARKS.md.
Measurements already in --keep are not repeated.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from common import machine, seeded_runs, shared, write_section

import headstart
from headstart import pipeline

HEADING = "## Fine-tuning on cached bottom activations against the frozen head (`python benchmarks/finetune_bench.py`)"


def one(data: Path, seed: int, kind: str, extra: dict) -> dict:
    settings = {"frozen": {}, "finetune": {"finetune": True, "cache_bottom": True, **extra},
                "finetune-auto": {"finetune": True, "cache_bottom": True, "ft_lr": "auto", **extra}}[kind]
    t = time.perf_counter()
    clf = headstart.train(data, seed=seed, progress=False, **settings)
    row = {"data": data.name, "seed": seed, "kind": kind, "seconds": round(time.perf_counter() - t, 1), "load": os.getloadavg()[0]}
    for split, m in clf.info["metrics"].items():
        row[split] = m["accuracy"]
        row[f"{split}_n"] = m["n"]
    row["input_size"] = clf.backbone.data_config["input_size"][-1]  # --finetune chooses it (input_size "auto")
    ft = clf.info.get("stages", {}).get("finetune")
    if ft:
        row["head_val"] = clf.info["stages"]["feature_extraction"]["val"]["accuracy"]  # the frozen head at that size
        share = (ft.get("selection") or {}).get("blend", 1.0 if ft["best_epoch"] else 0.0)
        row["kept"] = "head" if not ft["best_epoch"] else "fine-tuned" if share == 1 else f"blend {share:g}"
        row["selection"] = ft.get("selection")
    return row


def stats(rows: list[dict], key: str) -> str:
    vals = [100 * r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return ""
    return f"{statistics.mean(vals):.1f} ± {(max(vals) - min(vals)) / 2:.1f}" if len(vals) > 1 else f"{vals[0]:.1f}"


def table(rows: list[dict]) -> str:
    lines = ["| data | run | seeds | val accuracy % (mean ± half-range) | test accuracy % | images vs frozen, val, per seed | input px: its frozen head's val % (per seed) | kept (per seed) | held-out calibrated loss, head → fine-tuned (per seed) | time s (mean) |",
             "|---|---|---:|---:|---:|---|---|---|---|---:|"]
    for data in dict.fromkeys(r["data"] for r in rows):
        frozen = {r["seed"]: r for r in rows if r["data"] == data and r["kind"] == "frozen"}
        for kind in ("frozen", "finetune", "finetune-auto"):
            mine = sorted((r for r in rows if r["data"] == data and r["kind"] == kind), key=lambda r: r["seed"])
            if not mine:
                continue
            diff = ", ".join(f"{round((r['val'] - frozen[r['seed']]['val']) * r['val_n']):+d}" for r in mine if r["seed"] in frozen)
            kept = ", ".join(r.get("kept", "—") for r in mine)
            sizes = ", ".join(f"{r.get('input_size', '?')}: {100 * r['head_val']:.1f}" for r in mine if "head_val" in r)
            losses = ", ".join(f"{r['selection']['loss_before']:.3f} → {r['selection'].get('loss_finetuned', r['selection']['loss_after']):.3f}"
                               + (f" (kept {r['selection']['loss_after']:.3f})" if 0 < r["selection"].get("blend", 1) < 1 else "")
                               for r in mine if r.get("selection"))
            lines.append(f"| {data} | {kind} | {len(mine)} | {stats(mine, 'val')} | {stats(mine, 'test')} | {diff if kind != 'frozen' else ''} | {sizes} | "
                         f"{kept if kind != 'frozen' else ''} | {losses} | {statistics.mean(r['seconds'] for r in mine):.0f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> str:
    """The issue's bar per set: the mean gain of --finetune over the frozen head, and how often the head was kept."""
    lines = []
    for data in dict.fromkeys(r["data"] for r in rows):
        frozen = {r["seed"]: r for r in rows if r["data"] == data and r["kind"] == "frozen"}
        ft = [r for r in rows if r["data"] == data and r["kind"] == "finetune" and r["seed"] in frozen]
        if not ft:
            continue
        gain = statistics.mean(100 * (r["val"] - frozen[r["seed"]]["val"]) for r in ft)
        kept = sum(r.get("kept") == "head" for r in ft)
        lines.append(f"- {data}: `--finetune` (cached activations, the default) gains {gain:+.1f} pt of validation accuracy over the frozen head "
                     f"(mean of {len(ft)} seeds); the held-out photos kept the frozen head in {kept} of {len(ft)}.")
    return "\n".join(lines)


def main() -> None:
    ap = seeded_runs(Path("finetune_results.json"))
    ap.add_argument("--auto", action="store_true")
    ap.add_argument("--extra", default="{}")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    extra = json.loads(args.extra)
    done = json.loads(args.keep.read_text()) if args.keep.exists() else []
    kinds = ["frozen", "finetune"] + (["finetune-auto"] if args.auto else [])
    for name in args.data.split(","):
        data = shared() / "datasets" / name
        for seed in map(int, args.seeds.split(",")):
            for kind in kinds:
                if any(r["data"] == name and r["seed"] == seed and r["kind"] == kind for r in done):
                    continue
                done.append(one(data, seed, kind, extra))
                print(json.dumps(done[-1]), flush=True)
                args.keep.write_text(json.dumps(done, indent=1))
    for name in args.data.split(","):
        png = Path(__file__).resolve().parents[1] / "docs" / f"lr_find_{name}.png"
        if not png.exists():
            found = pipeline.lr_find(shared() / "datasets" / name, out=png.parent / f".lr_find_{name}", progress=False)
            os.replace(png.parent / f".lr_find_{name}" / "lr_find.png", png)
            print(name, found.message)
    if args.no_write:
        return
    load = os.getloadavg()
    body = f"""{HEADING}

Default backbone (EfficientNet-Lite0), default settings plus `finetune=True, cache_bottom=True` {json.dumps(extra) if extra else ''}
(and `ft_lr="auto"`: lr-find's valley). Machine: {machine()}; load average at the end {load[0]:.1f} (2 cores shared
with other work: times are wall time under that load). `images vs frozen`: validation photos gained (+) or lost (−)
against the frozen head of the same seed (the default run: the backbone's own 224 px). `--finetune` first chooses the
input size by cross-validation on the training photos (224, 256 or 288 px; `input px`, with the frozen head's validation
accuracy at that size, which fine-tuning starts from). `kept`: what the held-out fifth of the training photos chose by calibrated
loss: the head, the fine-tuned network, or a blend of a share of its weights with the starting ones (WiSE-FT); the
validation split chooses nothing. {args.note}

{table(done)}

{verdict(done)}

lr-find curves (the suggestion used in red): [clothing](docs/lr_find_clothing.png), [ants/bees](docs/lr_find_hymenoptera.png).
"""
    write_section("finetune-cached", body)


if __name__ == "__main__":
    main()
