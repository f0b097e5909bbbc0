"""`headstart compare` twice on the clothing set: first with an empty feature cache, then again with it warm.

    python benchmarks/compare_bench.py [--data DIR] [--backbones a,b,c]

Writes the section "## Compare: cold vs warm cache" of BENCHMARKS.md (other sections are left as they are).
The target: the warm re-run is at least 10x faster than the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

from headstart.compare import compare, format_table
from headstart.config import shared_dir
from headstart.features import resolve_precision

HEADING = "## Compare: cold vs warm cache"
BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def timed_compare(data: Path, names: list[str], out: Path, cache: Path) -> tuple[float, list[dict], int, tuple[float, ...]]:
    t = time.perf_counter()
    rows = compare(data, names, out, cache_dir=str(cache), progress=False)
    seconds = time.perf_counter() - t
    computed = sum(json.loads((out / r["run"] / "config.json").read_text())["timing"]["embeddings_computed"] for r in rows if r["status"] == "ok")
    return seconds, rows, computed, os.getloadavg()


def section(data: Path, names: list[str], cold: tuple, warm: tuple, load0: tuple[float, ...]) -> str:
    (cs, crows, cn, cload), (ws, wrows, wn, wload) = cold, warm
    warm_train = {r["backbone"]: r.get("train_s") for r in wrows}
    cmd = f"headstart compare {data.name} --backbones {','.join(names)}"
    lines = [
        HEADING,
        "",
        f"`python benchmarks/compare_bench.py` runs `{cmd}` twice into the same folder: first with an empty",
        "feature cache (every photo goes through every backbone), then again with the cache warm (every embedding",
        "is read back; what remains is scanning and hashing the photos, cross-validating the head, saving the bundle,",
        "timing single-photo predictions and writing the reports).",
        "",
        "| run | wall time | embeddings computed |",
        "|---|---:|---:|",
        f"| first run, empty cache | {cs:.1f} s | {cn:,} |",
        f"| re-run, warm cache | {ws:.1f} s | {wn:,} |",
        f"| **speed-up** | **{cs / ws:.1f}×** | target ≥ 10× |",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores **shared with other jobs** (load average "
        f"{load0[0]:.1f} before, {cload[0]:.1f} after the first run, {wload[0]:.1f} after the re-run: the timings are",
        f"noisy and slower than on an idle machine); torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{resolve_precision('auto')} features; Python {platform.python_version()}.",
        "",
        "Leaderboard of the first run (validation accuracy; extraction images/s measured while computing the",
        "embeddings; predict latency = median single-photo `predict`):",
        "",
        format_table(crows, markdown=True).rstrip(),
        "",
        "Train time per backbone in the re-run: " + ", ".join(f"{k} {v:.1f} s" for k, v in warm_train.items() if v is not None) + ".",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str, path: Path = BENCHMARKS) -> None:
    """Replace this benchmark's section (up to the next '## ' heading), or append it; other sections stay."""
    old = path.read_text() if path.is_file() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(HEADING)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    path.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=shared_dir() / "datasets" / "clothing")
    ap.add_argument("--backbones", default="efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    ap.add_argument("--no-write", action="store_true", help="Print the section instead of writing BENCHMARKS.md.")
    args = ap.parse_args()
    names = args.backbones.split(",")
    with tempfile.TemporaryDirectory(prefix="hs-compare-bench-") as tmp:
        cache, out = Path(tmp) / "cache", Path(tmp) / "cmp"
        load0 = os.getloadavg()
        cold = timed_compare(args.data, names, out, cache)
        print(f"first run: {cold[0]:.1f} s, {cold[2]} embeddings computed", file=sys.stderr)
        warm = timed_compare(args.data, names, out, cache)
        print(f"re-run:    {warm[0]:.1f} s, {warm[2]} embeddings computed", file=sys.stderr)
    text = section(args.data, names, cold, warm, load0)
    print(text)
    if not args.no_write:
        write_section(text)


if __name__ == "__main__":
    main()
