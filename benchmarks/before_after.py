"""An earlier commit's code against today's, on this machine, in the same sitting: what a change bought.

    python benchmarks/before_after.py [REF] [--photos 3000] [--repeat 3]

Absolute times move with the machine and the sitting (the starting code's 3 000-photo run took 53 s, then 39 s,
on one VM), so a goal set on one machine is checked here by the ratio of two runs side by side. ``REF`` is checked
out into a temporary git worktree (by default ``BASELINE``, the code the speed issue's starting numbers were
measured on: 3 000 photos in 34.8 s, ants/bees 4.0x faster than the Keras recipe); each row runs in a fresh process
with ``PYTHONPATH`` pointing at one of the two ``src`` folders, the two versions taking turns so a change of load
weighs on both. Rows:

- *N photos, empty cache*: ``headstart.train`` on N clothing photos (the scaling benchmark's folder; imports and
  weight loading before the clock), every photo decoded and embedded;
- *new photos*: ``headstart train`` on ants/bees in a fresh process, the backbone's export cached by an earlier
  run of the same version, no embeddings cached (what a user meets every day).

Writes the ``before-after`` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, machine, shared, write_section
from compare_keras import load_line, photo_folder

TRAIN = r"""
import json, sys, tempfile, time
import headstart
from headstart import backbones
backbones.load()  # imports and the weight file's first read before the clock, as in the scaling benchmark
with tempfile.TemporaryDirectory() as cache:
    t = time.perf_counter()
    clf = headstart.train(sys.argv[1], cache_dir=cache, progress=False)
    wall = time.perf_counter() - t
print(json.dumps({"wall": wall, **clf.info["timing"]}))
"""
BASELINE = "0615aea"
KEPT = ("onnx", "backbones")  # what an earlier run leaves that a new folder's run reuses: the export, the weights


def in_version(src: Path, args: list[str], env: dict[str, str] | None = None) -> tuple[float, str]:
    """Wall time and standard output of ``python ARGS`` with ``src`` first on the import path."""
    t = time.perf_counter()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(src), **(env or {})})
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{src}: {' '.join(args[:3])} failed:\n{p.stderr[-3000:]}")
    return wall, p.stdout


def new_photos(src: Path, warm: Path, out: Path) -> tuple[float, float]:
    """Wall time of one ants/bees run with only ``KEPT`` of the warm cache, and its validation accuracy."""
    with tempfile.TemporaryDirectory() as fresh:
        for kept in KEPT:
            if (warm / kept).is_dir():
                shutil.copytree(warm / kept, Path(fresh) / kept)
        hym = shared() / "datasets" / "hymenoptera"
        wall, _ = in_version(src, ["-m", "headstart", "train", str(hym), "--out", str(out), "--quiet"], {"HEADSTART_CACHE": fresh})
    return wall, json.loads((out / "metrics.json").read_text())["accuracy"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("ref", nargs="?", default=BASELINE, help=f"the earlier commit (any git revision; default {BASELINE})")
    ap.add_argument("--photos", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", a.ref], check=True, capture_output=True, text=True).stdout.strip()
    load_before = load_line()
    res: dict[str, dict[str, list[float]]] = {v: {"wall": [], "extract_s": [], "head_s": [], "new": [], "acc": []} for v in ("before", "after")}
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(tree), sha], check=True)
        try:
            srcs = {"before": tree / "src", "after": ROOT / "src"}
            folder = photo_folder(Path(tmp), a.photos)
            hym = shared() / "datasets" / "hymenoptera"
            for v, src in srcs.items():  # each version's export in its own warm cache, made once
                in_version(src, ["-m", "headstart", "train", str(hym), "--out", f"{tmp}/warm-{v}", "--quiet"], {"HEADSTART_CACHE": f"{tmp}/cache-{v}"})
            for r in range(a.repeat):
                for v, src in srcs.items():
                    _, out = in_version(src, ["-c", TRAIN, str(folder)])
                    timing = json.loads(out.strip().splitlines()[-1])
                    for k in ("wall", "extract_s", "head_s"):
                        res[v][k].append(timing[k])
                    wall, acc = new_photos(src, Path(f"{tmp}/cache-{v}"), Path(tmp) / f"new-{v}-{r}")
                    res[v]["new"].append(wall)
                    res[v]["acc"].append(acc)
                    print(v, r, {k: round(x[-1], 3) for k, x in res[v].items()}, flush=True)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    write_section("before-after", section(a, sha, res, load_before))


def section(a: argparse.Namespace, sha: str, res: dict, load_before: str) -> str:
    med = {v: {k: statistics.median(x) for k, x in r.items()} for v, r in res.items()}

    def row(label: str, key: str, unit: str = "s", digits: int = 1) -> str:
        b, n = med["before"][key], med["after"][key]
        runs = lambda v: ", ".join(f"{x:.{digits}f}" for x in res[v][key])  # noqa: E731
        return f"| {label} | {b:.{digits}f} {unit} ({runs('before')}) | **{n:.{digits}f} {unit}** ({runs('after')}) | {n / b:.2f}× |"

    return f"""## Before and after on the same machine (`python benchmarks/before_after.py {a.ref}`)

Machine: {machine()}. {load_before} at the start, {load_line()} at the end. The code of `{sha}` against this
commit's, each row in a fresh process, the two taking turns, median of {a.repeat}. Ratios travel between machines
better than times: on this VM the starting code's 3 000-photo run took 53 s, 39 s and 58 s in three sittings on two days.

| row | before (`{sha}`) | after | after ÷ before |
|---|---:|---:|---:|
{row(f"{a.photos} clothing photos, empty cache: wall time", "wall")}
{row("… of which feature extraction", "extract_s")}
{row("… of which head selection + fit", "head_s", digits=2)}
{row("ants/bees, new photos (`headstart train`, export cached, no embeddings)", "new")}

Validation accuracy of the new-photos runs: before {100 * med['before']['acc']:.1f} %, after {100 * med['after']['acc']:.1f} %.
"""


if __name__ == "__main__":
    main()
