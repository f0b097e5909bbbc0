"""Running under torchrun: which process am I, and the few collectives headstart needs.

headstart does not launch or schedule processes itself. ``torchrun`` (``python -m torch.distributed.run``) starts
them and sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; ``init()`` joins the process group it describes (gloo
on CPUs, nccl when CUDA is available). Outside torchrun every helper here answers as for a single process, so the
rest of the code calls them unconditionally.

Gathering goes through ``all_gather_object`` (pickled Python objects). That is simple and works on both backends;
it is meant for embeddings of moderate size (a few hundred MB in all), since every rank receives every shard.

torch is imported only inside torchrun (or when a device is asked for): a plain cached re-run never needs it.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def launched() -> bool:
    """True in a process started by torchrun (even with a single process)."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def init() -> bool:
    """Join torchrun's process group when there is more than one process; True when distributed."""
    if active():
        return True
    if not launched() or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    if rank() != 0:  # rank 0 tells the story; the others speak only of errors
        logging.getLogger("headstart").addFilter(lambda record: record.levelno >= logging.ERROR)
    return True


def shutdown() -> None:
    if active():
        _dist().destroy_process_group()


def active() -> bool:
    """True once ``init()`` joined a process group (never outside torchrun, where torch stays unimported)."""
    if not launched():
        return False
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def _dist():
    import torch.distributed

    return torch.distributed


def rank() -> int:
    """This process's global rank (0 outside torchrun); read from the environment before ``init()``."""
    return _dist().get_rank() if active() else int(os.environ.get("RANK", 0))


def world() -> int:
    return _dist().get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def local_world() -> int:
    """Processes on this machine: they share its cores."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if launched() else 1


def cores() -> int:
    """The cores this process may use: those it may run on (its CPU affinity: taskset, a cpuset), shared among the
    torchrun processes on this machine. The one answer for extraction's pipelines and the head search's threads."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no affinity on this platform
        n = os.cpu_count() or 1
    return max(1, n // local_world())


def is_main() -> bool:
    """Rank 0 logs, shows progress bars and writes every file of a run."""
    return rank() == 0


def device() -> torch.device:
    """Where this process computes: its own GPU under torchrun when CUDA is available, otherwise the CPU.

    A plain ``headstart train`` keeps computing on the CPU, as it always has."""
    import torch

    if launched() and torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def device_type() -> str:
    """``device().type``, without importing torch where the answer cannot be a GPU (outside torchrun)."""
    return device().type if launched() else "cpu"


def barrier() -> None:
    if active():
        _dist().barrier()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (any picklable value, e.g. numpy arrays), in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world()
    _dist().all_gather_object(out, obj)
    return out


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank: for decisions that must be the same everywhere."""
    if not active():
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=src)
    return box[0]
