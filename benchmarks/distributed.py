"""Extraction throughput under torchrun: 1 process vs N (one per GPU when CUDA is available, else CPU processes).

    python benchmarks/distributed.py [N]        (N: default, every GPU; on a CPU-only machine, 2 processes)

Each run computes every hymenoptera photo (no cache) with `features.extract_sharded`; the time is rank 0's
wall time from a barrier after model loading to the gathered result. Writes the "distributed" section of
BENCHMARKS.md.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine, shared, write_section

WORKER = """
import sys, time
from headstart import backbones, distributed, features
from headstart.data import scan

distributed.init()
ds = scan(sys.argv[1])
paths = ds.splits["train"].paths + ds.splits["val"].paths
lb = backbones.load()
features.extract_sharded(paths[:64], lb, use_cache=False, progress=False)  # warm-up
distributed.barrier()
t = time.perf_counter()
features.extract_sharded(paths, lb, use_cache=False, progress=False)
if distributed.is_main():
    print(f"RESULT {len(paths) / (time.perf_counter() - t):.1f} {distributed.device().type}")
distributed.shutdown()
"""


def throughput(nproc: int) -> tuple[float, str]:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "worker.py"
        script.write_text(WORKER)
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                              str(script), str(shared() / "datasets" / "hymenoptera")], env=env, check=True,
                             capture_output=True, text=True).stdout
    _, rate, dev = next(line for line in out.splitlines() if line.startswith("RESULT")).split()
    return float(rate), dev


REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))


def median_throughput(nproc: int) -> tuple[float, str]:
    runs = [throughput(nproc) for _ in range(REPEAT)]
    return statistics.median(r for r, _ in runs), runs[0][1]


def main() -> None:
    import torch

    n = int(sys.argv[1]) if len(sys.argv) > 1 else (torch.cuda.device_count() or 2)
    rows = [(k, *median_throughput(k)) for k in sorted({1, n})]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    body = "\n".join([
        "## Sharded extraction under torchrun (`python benchmarks/distributed.py`)",
        "",
        f"{machine()}; {gpu}. All 398 hymenoptera photos, efficientnet_lite0, no cache, median of {REPEAT} runs each; "
        "rank 0's time from a barrier after model loading to the gathered result.",
        "",
        "| processes | device | images/s | speed-up |",
        "|---|---|---|---|",
        *[f"| {k} | {dev} | {rate:.1f} | {rate / rows[0][1]:.2f}× |" for k, rate, dev in rows],
    ])
    write_section("distributed", body)
    print(body)


if __name__ == "__main__":
    main()
