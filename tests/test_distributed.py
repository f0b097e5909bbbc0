"""The same pipeline under torchrun: 2 CPU processes (gloo) against one, on real photos. No GPU needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from conftest import HYMENOPTERA, ants_bees
from headstart import backbones, distributed, features
from headstart.transforms import train_transform
from headstart.data import scan
from headstart.finetune import _Augmented, _epoch_seed

SRC = Path(__file__).resolve().parents[1] / "src"
EXTRACT = """
import sys
import numpy as np
from headstart import backbones, distributed, features
from headstart.data import scan

distributed.init()
ds = scan(sys.argv[1])
paths = ds.splits["train"].paths + ds.splits["val"].paths
f = features.extract_sharded(paths, backbones.load(), progress=False)
if distributed.is_main():
    np.savez(sys.argv[2], x=f.x, ok=f.ok, computed=f.computed, world=distributed.world(), runtime=f.runtime)
distributed.shutdown()
"""


def _env(**extra: str) -> dict[str, str]:
    """Children see this checkout's source and one thread each (2 ranks on 2 cores)."""
    path = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def _torchrun(nproc: int, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    # --standalone: a rendezvous on a free local port, so parallel test runs never collide
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


@pytest.mark.slow
def test_sharded_extraction_equals_a_single_process(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(EXTRACT)
    cache = tmp_path / "cache"
    _torchrun(2, str(script), str(HYMENOPTERA), str(tmp_path / "ddp.npz"), env=_env(HEADSTART_CACHE=str(cache)))
    got = np.load(tmp_path / "ddp.npz")
    assert int(got["world"]) == 2

    ds = scan(HYMENOPTERA)
    paths = ds.splits["train"].paths + ds.splits["val"].paths
    single = features.extract(paths, backbones.load(), progress=False)  # the session cache: a single process
    assert got["ok"].tolist() == single.ok.tolist() and got["ok"].all()
    assert int(got["computed"]) == len(paths)  # every photo computed once, by one rank or the other
    assert str(got["runtime"]) == single.runtime == "onnxruntime"  # what the ranks ran is reported, as a single process does
    np.testing.assert_allclose(got["x"], single.x, rtol=0, atol=1e-2 * np.abs(single.x).max())  # ~1 bf16 step
    assert np.abs(got["x"] - single.x).mean() < 1e-3 * np.abs(single.x).mean() + 1e-6
    # both ranks wrote their shard's entries into the one cache folder: one entry per distinct photo
    entries = list(cache.rglob("*.npy"))
    assert len(entries) == len({features.file_digest(p) for p in paths})


@pytest.mark.slow
def test_ddp_fine_tuning_matches_one_process_and_only_rank_0_writes(tmp_path):
    small = ants_bees(tmp_path / "small", {"train": 24, "val": 12})
    common = [str(small), "--finetune", "--no-cache-bottom", "--epochs", "2", "--seed", "3", "--json",  # the per-epoch loop: what runs under torchrun
              "--input-size", "224"]  # the size search is extraction and head fits, whose sharding has tests of its own
    env = _env(HEADSTART_CACHE=str(tmp_path / "cache"))
    def headstart(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "headstart", "train", *common, *args], env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    headstart("--ft-batch-size", "16", "--out", str(tmp_path / "one"))
    two = headstart("--ft-batch-size", "8", "--out", str(tmp_path / "two"), "--nproc", "2")  # relaunched through torchrun
    assert two.stdout.count('"metrics"') == 1  # one summary, from rank 0
    assert "[rank 1]" not in two.stderr  # rank 1 logged nothing (it has no errors to report)

    a, b = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("one", "two"))
    assert b["train_config"]["ft_batch_size"] * 2 == a["train_config"]["ft_batch_size"]  # same global batch
    for stage in ("feature_extraction", "finetune"):
        n = a["stages"][stage]["val"]["n"]
        assert n == b["stages"][stage]["val"]["n"] == 24
        assert abs(a["stages"][stage]["val"]["accuracy"] - b["stages"][stage]["val"]["accuracy"]) * n <= 1 + 1e-9, stage
    # the head stage sees the same gathered features: the same head, the same numbers
    assert a["stages"]["feature_extraction"]["val"]["log_loss"] == pytest.approx(b["stages"]["feature_extraction"]["val"]["log_loss"], abs=2e-3)
    assert [r["epoch"] for r in a["history"] if r["stage"] == "finetune"] == [0, 1, 2]  # epoch 0: the starting point
    assert [r["epoch"] for r in b["history"] if r["stage"] == "finetune"] == [0, 1, 2]

    # exactly the files of a single-process run, nothing more (no rank-1 leftovers, no checkpoint, no temp files)
    def files(d: Path) -> list[str]:  # thumbnails/ holds one picture per misclassified photo: it may differ by one
        return sorted(str(p.relative_to(d)) for p in d.rglob("*") if not str(p.relative_to(d)).startswith("thumbnails"))

    assert files(tmp_path / "two") == files(tmp_path / "one")
    assert "model.safetensors" in files(tmp_path / "two")


def test_global_batches_and_augmentation_do_not_depend_on_the_number_of_ranks():
    """Why the two runs above can match: step k of 2 ranks × 8 images uses the very images of step k of 1 × 16,
    and each image is augmented identically whichever rank draws it."""
    n, batch, epoch, seed = 48, 16, 2, 3

    def steps(world: int) -> list[set[int]]:
        per_rank = []
        for r in range(world):
            s = DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=True, seed=_epoch_seed(seed, 0))
            s.set_epoch(epoch)
            idx = list(s)
            per_rank.append([idx[i:i + batch // world] for i in range(0, len(idx), batch // world)])
        return [set().union(*(rank_steps[k] for rank_steps in per_rank)) for k in range(len(per_rank[0]))]

    assert steps(2) == steps(1) and steps(4) == steps(1)
    assert steps(1) != [set(range(k, k + batch)) for k in range(0, n, batch)]  # and shuffled

    ds = scan(HYMENOPTERA)
    aug = _Augmented(ds.splits["train"].subset([0, 1, 2, 3]), train_transform(backbones.load().data_config, "classic"), 256)
    aug.seed = _epoch_seed(seed, epoch)
    forward = [aug[i][0] for i in range(4)]
    backward = {i: aug[i][0] for i in reversed(range(4))}
    assert all(torch.equal(forward[i], backward[i]) for i in range(4))
    one_loader = torch.cat([x for x, _ in DataLoader(aug, batch_size=4, num_workers=2, collate_fn=lambda b: (torch.stack([t for t, _ in b]), 0))])
    assert torch.equal(one_loader, torch.stack(forward))  # loader workers draw the same pixels


def test_outside_torchrun_everything_is_one_process(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert not distributed.init()
    assert (distributed.rank(), distributed.world(), distributed.is_main()) == (0, 1, True)
    assert distributed.all_gather({"a": np.arange(3)})[0]["a"].tolist() == [0, 1, 2]
    assert distributed.broadcast(7) == 7
    assert distributed.device().type == "cpu"


def test_nproc_relaunches_through_torchrun_and_refuses_inside_it(tmp_path):
    from click.testing import CliRunner

    from headstart.cli import main

    env = {"LOCAL_RANK": "0", "WORLD_SIZE": "1", "RANK": "0"}
    res = CliRunner(env=env).invoke(main, ["train", str(tmp_path), "--nproc", "2"])
    assert res.exit_code == 2 and "drop it when launching with torchrun" in res.output


def test_cores_follow_the_affinity_and_are_shared_among_the_local_ranks(monkeypatch):
    """Under taskset or a cpuset a process may run on fewer cores than the machine has: extraction's pipelines and
    the head search's threads count those, shared among the torchrun processes on the machine, never fewer than one."""
    from headstart import distributed

    monkeypatch.setattr(distributed.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    assert distributed.cores() == 6
    monkeypatch.setattr(distributed, "local_world", lambda: 4)
    assert distributed.cores() == 1
    monkeypatch.setattr(distributed, "local_world", lambda: 8)
    assert distributed.cores() == 1
