"""Choosing the fine-tuning defaults on training photos only: the held-out check per setting, seed and data set.

    python benchmarks/finetune_defaults.py [--data clothing,hymenoptera] [--seeds 0,1,2] [--keep finetune_defaults_results.json]
                                           [--settings '[{"ft_epochs": 12, "unfreeze": 5}, ...]'] [--render]

Each run is `headstart.train(DATA, finetune=True, seed=S, **settings)` stopped right after fine-tuning's held-out
check: the schedule trained on four fifths of the training photos, and the calibrated loss on the other fifth of the
head refitted without them and of each blend (finetune.BLENDS). The final run on all photos, and with it the
validation split, is never reached, so nothing here can be chosen by the photos a run reports. Writes the
"finetune-defaults" section of BENCHMARKS.md; measurements already in --keep are not repeated.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from common import machine, seeded_runs, shared, write_section

import headstart
from headstart import finetune

HEADING = "## Choosing the fine-tuning defaults on held-out training photos (`python benchmarks/finetune_defaults.py`)"
SETTINGS = [{"ft_epochs": 8, "unfreeze": 3}, {"ft_epochs": 12, "unfreeze": 3}, {"ft_epochs": 12, "unfreeze": 3, "ft_mixup": 0.2},
            {"ft_epochs": 12, "unfreeze": 3, "ft_ema": 0.99}, {"ft_epochs": 12, "unfreeze": 3, "ft_views": 4},
            {"ft_epochs": 8, "unfreeze": 5}, {"ft_epochs": 12, "unfreeze": 5}, {"ft_epochs": 12, "unfreeze": 7}]


class _Checked(Exception):
    """Raised where the final fine-tuning run would start: the check has been scored."""


def check(data: Path, seed: int, settings: dict) -> dict:
    """The held-out check's calibrated loss per blend (share of fine-tuned weights) for one run."""
    record: dict = {}
    real_check, real_train = finetune._check, finetune.train_top

    def scored(*a, **k):
        rows, sel = real_check(*a, **k)
        record.update(sel)
        return rows, sel

    def stop_before_final(top, views, labels, cfg, regime, watch, stage):
        if stage == "finetune":
            raise _Checked
        return real_train(top, views, labels, cfg, regime, watch, stage)

    finetune._check, finetune.train_top = scored, stop_before_final
    try:
        headstart.train(data, finetune=True, seed=seed, progress=False, **settings)
    except _Checked:
        pass
    finally:
        finetune._check, finetune.train_top = real_check, real_train
    return {"data": data.name, "settings": settings, "seed": seed, "blends": record["blends"]}


def _same(a: dict, b: dict) -> bool:
    """Two settings alike once the defaults of the fields they name are filled in (unfreeze 3 = the old default)."""
    base = {"ft_epochs": 12, "unfreeze": 5}
    return {**base, **a} == {**base, **b}


def table(rows: list[dict]) -> str:
    lines = ["| data | setting | held-out calibrated loss: head → best blend (share kept), per seed | mean gain |", "|---|---|---|---:|"]
    for data in dict.fromkeys(r["data"] for r in rows):
        seen: list[dict] = []
        for r in rows:
            if r["data"] != data or any(_same(r["settings"], s) for s in seen):
                continue
            seen.append(r["settings"])
            mine = sorted((x for x in rows if x["data"] == data and _same(x["settings"], r["settings"])), key=lambda x: x["seed"])
            cells, gains = [], []
            for x in mine:
                best = min(x["blends"], key=lambda a: (x["blends"][a], float(a)))
                gains.append(x["blends"]["0"] - x["blends"][best])
                cells.append(f"{x['blends']['0']:.3f} → {x['blends'][best]:.3f} ({best})")
            name = ", ".join(f"{k} {v}" for k, v in r["settings"].items())
            lines.append(f"| {data} | {name} | {'; '.join(cells)} (seeds {', '.join(str(x['seed']) for x in mine)}) | "
                         f"{statistics.mean(gains):.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = seeded_runs(Path(__file__).with_name("finetune_defaults_results.json"))
    ap.add_argument("--settings", default=json.dumps(SETTINGS))
    ap.add_argument("--render", action="store_true", help="only rewrite the section from --keep")
    args = ap.parse_args()
    done = json.loads(args.keep.read_text()) if args.keep.exists() else []
    if not args.render:
        for name in args.data.split(","):
            for settings in json.loads(args.settings):
                for seed in map(int, args.seeds.split(",")):
                    if any(r["data"] == name and r["seed"] == seed and _same(r["settings"], settings) for r in done):
                        continue
                    done.append(check(shared() / "datasets" / name, seed, settings))
                    print(json.dumps(done[-1]), flush=True)
                    args.keep.write_text(json.dumps(done, indent=1))
    body = f"""{HEADING}

Machine: {machine()}. Default backbone (EfficientNet-Lite0), `finetune=True` on cached activations, each run stopped
after fine-tuning's held-out check (the schedule trained on four fifths of the training photos, scored on the other
fifth): the calibrated loss of the head refitted without those photos, and of the best blend of it with the
fine-tuned weights (the share in brackets; 1 = all fine-tuned). Nothing here saw the validation or test photos, so
choosing the defaults by it leaks nothing into the reported accuracy. Ants/bees judge on 49 photos, clothing on 200:
clothing's column is the steadier. {args.note}

{table(done)}
"""
    write_section("finetune-defaults", body)


if __name__ == "__main__":
    main()
