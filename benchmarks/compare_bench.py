"""`headstart compare` on the clothing set: first with an empty feature cache, then again with it warm.

    python benchmarks/compare_bench.py [--data DIR] [--backbones a,b,c]

Three runs: (1) empty cache, new folder; (2) the same command again into the same folder, as a user re-runs it
(finished runs whose photos, settings and weights are unchanged are reused); (3) the pretrained backbones into a
new folder with the feature cache warm (every embedding and head fit read back, every report rewritten).
Writes the "compare" section of BENCHMARKS.md (other sections are left as they are).
The target: the warm re-run is at least 10x faster than the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, write_section

from headstart.backbones import lookup
from headstart.compare import compare, format_table
from headstart.config import shared_dir

HEADING = "## Compare: cold vs warm cache"


def timed_compare(data: Path, names: list[str], out: Path, cache: Path) -> tuple[float, list[dict], int, int, tuple[float, ...]]:
    t = time.perf_counter()
    rows = compare(data, names, out, cache_dir=str(cache), progress=False)
    seconds = time.perf_counter() - t
    fresh = [r for r in rows if r["status"] == "ok" and not r.get("reused")]
    computed = sum(json.loads((out / r["run"] / "config.json").read_text())["timing"]["embeddings_computed"] for r in fresh)
    reused = sum(1 for r in rows if r.get("reused"))
    return seconds, rows, computed, reused, os.getloadavg()


def section(data: Path, names: list[str], cold: tuple, warm: tuple, refit: tuple | None, pretrained: list[str], load0: tuple[float, ...]) -> str:
    (cs, crows, cn, _, cload), (ws, _, wn, wr, wload) = cold, warm
    cmd = f"headstart compare {data.name} --backbones {','.join(names)}"
    scratch = next((r["rank"] for r in crows if r["backbone"] == "scratch" and r["status"] == "ok"), None)
    ranked_ok = None if scratch is None else all(r["rank"] < scratch for r in crows if r["status"] == "ok" and r["backbone"] != "scratch")
    lines = [
        HEADING,
        "",
        f"`python benchmarks/compare_bench.py` runs `{cmd}` with an empty feature cache, then the same",
        "command again into the same folder, as a user re-runs it: a backbone whose photos (by content), settings and",
        "starting weights are unchanged keeps its finished run (`train(..., reuse=True)`), so what remains is hashing",
        "the photos, loading each bundle, timing single-photo predictions and rewriting the leaderboard and report.",
        "The third row trains the pretrained backbones again into a new folder with the feature cache warm: every",
        "embedding and every head's fit is read back from the cache, every run folder and report written anew.",
        "",
        "| run | wall time | embeddings computed | runs reused | speed-up |",
        "|---|---:|---:|---:|---:|",
        f"| first run, empty cache | {cs:.1f} s | {cn:,} | 0 | 1× |",
        f"| **re-run, same folder** | **{ws:.1f} s** | {wn:,} | {wr} | **{cs / ws:.1f}×** (target ≥ 10×) |",
        *([f"| {', '.join(pretrained)} into a new folder, warm feature cache | {refit[0]:.1f} s | {refit[2]:,} | 0 | "
           f"{sum(r['train_s'] for r in crows if r['backbone'] in pretrained and r.get('train_s')) / refit[0]:.1f}× vs their first-run train time |"]
          if refit else []),
        "",
        f"Machine: {machine()}; {torch.get_num_threads()} threads. Load average (1 min) {load0[0]:.1f} before, {cload[0]:.1f} after the "
        f"first run, {wload[0]:.1f} after the re-run.",
        "",
        "Leaderboard of the first run (validation accuracy; extraction images/s measured while computing the",
        "embeddings; predict latency = median single-photo `predict`):",
        "",
        format_table(crows, markdown=True).rstrip(),
        "",
        *([f"Pretrained backbones ranked above scratch: **{'yes' if ranked_ok else 'NO'}**.", ""] if ranked_ok is not None else []),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=shared_dir() / "datasets" / "clothing")
    ap.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2,scratch")
    ap.add_argument("--no-write", action="store_true", help="Print the section instead of writing BENCHMARKS.md.")
    args = ap.parse_args()
    names = args.backbones.split(",")
    with tempfile.TemporaryDirectory(prefix="hs-compare-bench-") as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "cmp"
        load0 = os.getloadavg()
        cold = timed_compare(args.data, names, out, cache)
        print(f"first run: {cold[0]:.1f} s, {cold[2]} embeddings computed", file=sys.stderr)
        warm = timed_compare(args.data, names, out, cache)
        print(f"re-run:    {warm[0]:.1f} s, {warm[2]} embeddings computed, {warm[3]} runs reused", file=sys.stderr)
        pretrained = [n for n in names if lookup(n).pretrained]
        refit = timed_compare(args.data, pretrained, Path(tmp) / "cmp-refit", cache) if pretrained else None
        if refit:
            print(f"refit:     {refit[0]:.1f} s, {refit[2]} embeddings computed", file=sys.stderr)
    text = section(args.data, names, cold, warm, refit, pretrained, load0)
    print(text)
    if not args.no_write:
        write_section("compare", text)


if __name__ == "__main__":
    main()
