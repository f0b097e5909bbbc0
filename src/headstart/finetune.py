"""Fine-tuning: the second half of the classic recipe, and the loop that trains the from-scratch baseline.

After the new head has learned on frozen features, the top blocks of the backbone are unfrozen and training goes
on gently: the head at ``ft_lr``, the backbone at a tenth of that, BatchNorm statistics frozen (the classic bug is
frozen weights with moving BN statistics), early stopping on validation loss, the best epoch's weights kept.

Every epoch ends with an atomic checkpoint (safetensors + JSON, nothing pickled). Shuffling and dropout are seeded
per epoch and each image's augmentation per (epoch, image), so a resumed run continues exactly as an uninterrupted
one would have.

Under torchrun the net is wrapped in DistributedDataParallel: the shuffled order is cut by a DistributedSampler
so that each step's global batch (``ft_batch_size`` per rank × ranks) holds exactly the images a single process
with that batch size would use, each augmented the same way; only rank 0 writes the checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset
from tqdm.auto import tqdm

from . import distributed, features, transforms
from .config import HeadstartError, TrainConfig
from .data import Split, open_rgb
from .files import atomic_path

log = logging.getLogger("headstart")
CHECKPOINT = "checkpoint.safetensors"


class Interrupted(HeadstartError):
    """Ctrl-C during training: the last finished epoch is checkpointed."""


class Net(nn.Module):
    """Backbone features → head logits, as one trainable module."""

    def __init__(self, backbone: nn.Module, head: nn.Sequential):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True))


# ------------------------------------------------------------------------------------------ what trains


def block_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names per block, bottom to top, from timm's own fine-grained grouping of the model."""
    from timm.models._manipulate import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=False))
    return [groups[k] for k in sorted(groups)]


def unfreeze_top(model: nn.Module, blocks: int = 0, layers: int = 0) -> list[str]:
    """Freeze everything, then unfreeze the top ``blocks`` blocks, or (the Keras way) the last ``layers`` layers
    that have weights. Returns the names of what was unfrozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    if layers:
        owners = [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]
        chosen = owners[-layers:]
        for _, m in chosen:
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)
        return [n for n, _ in chosen]
    groups = block_groups(model)[-blocks:] if blocks else []
    names = {n for g in groups for n in g}
    for n, p in model.named_parameters():
        if n in names:
            p.requires_grad_(True)
    return sorted({n.rsplit(".", 1)[0] for n in names})


def freeze_batchnorm(model: nn.Module) -> None:
    """BatchNorm layers in inference mode: running statistics stay exactly as pretrained."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


# ------------------------------------------------------------------------------------------------ data


class _Augmented(torch.utils.data.Dataset):
    """Decoded, transformed images; with ``seed`` set, image i's random augmentation depends on (seed, i) only,
    not on which loader worker or which rank draws it."""

    def __init__(self, split: Split, transform, min_size: int):
        self.split, self.transform, self.min_size = split, transform, min_size
        self.seed: int | None = None

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        try:
            img = open_rgb(self.split.paths[i], self.min_size)
            if self.seed is not None:
                transforms.seed(self.seed * 1_000_003 + i)
            return self.transform(img), self.split.labels[i]
        except ValueError:
            return None  # reported once at feature extraction; dropped here


def _collate(items):
    items = [it for it in items if it is not None]
    if not items:
        return None
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


# ---------------------------------------------------------------------------------------------- the loop


@dataclass
class FitResult:
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    unfrozen: list[str] = field(default_factory=list)


@dataclass
class _Loop:
    """Everything one training loop works with, set up once by ``_setup``."""

    net: Net
    model: nn.Module  # ``net``, or its DistributedDataParallel wrapper under torchrun
    opt: torch.optim.Optimizer
    train_ds: _Augmented
    val_ds: _Augmented
    sampler: DistributedSampler
    stage: str
    cfg: TrainConfig
    precision: str
    layout: torch.memory_format
    dev: torch.device
    workers: int
    epochs: int
    patience: int
    loss_fn: nn.Module
    result: FitResult
    best_state: dict[str, torch.Tensor] | None = None

    @property
    def scratch(self) -> bool:
        return self.stage == "scratch"


def _trainable(net: Net, cfg: TrainConfig, scratch: bool) -> tuple[list[str], torch.optim.Optimizer]:
    """Unfreeze what this stage trains; AdamW with the head at its rate, the backbone at ``backbone_lr_ratio`` of it."""
    if scratch:
        for p in net.parameters():
            p.requires_grad_(True)
        unfrozen = ["all"]
    else:
        unfrozen = unfreeze_top(net.backbone, blocks=cfg.unfreeze, layers=cfg.unfreeze_layers)
        for p in net.head.parameters():
            p.requires_grad_(True)
    head_lr = cfg.lr if scratch else cfg.ft_lr
    backbone_params = [p for p in net.backbone.parameters() if p.requires_grad]
    groups = [{"params": list(net.head.parameters()), "lr": head_lr}]
    if backbone_params:
        groups.append({"params": backbone_params, "lr": head_lr * (1.0 if scratch else cfg.backbone_lr_ratio)})
    return unfrozen, torch.optim.AdamW(groups, weight_decay=cfg.ft_weight_decay)


def _setup(net: Net, train: Split, val: Split, data_config: dict[str, Any], cfg: TrainConfig, stage: str) -> _Loop:
    scratch = stage == "scratch"
    unfrozen, opt = _trainable(net, cfg, scratch)
    precision = features.resolve_precision(cfg.precision)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    dev = distributed.device()
    net.to(dev, memory_format=layout)
    groups = opt.param_groups
    log.info("%s: %s trainable parameters (%s), head lr %g, backbone lr %g, BN %s, augmentation %s, %s",
             stage, f"{sum(p.numel() for p in net.parameters() if p.requires_grad):,}", ", ".join(unfrozen[-4:]) + (" …" if len(unfrozen) > 4 else ""),
             groups[0]["lr"], groups[-1]["lr"] if len(groups) > 1 else 0, "training" if scratch or cfg.train_bn else "frozen", cfg.augment, precision)
    model: nn.Module = net
    if distributed.active():  # averages gradients over ranks; the frozen part takes no part in it
        model = DistributedDataParallel(net, device_ids=[dev] if dev.type == "cuda" else None, find_unused_parameters=False)
    min_size = transforms.decode_size(data_config)
    train_ds = _Augmented(train, transforms.train_transform(data_config, cfg.augment), min_size)
    # The single-process order too: randperm(seed·100003 + epoch), cut into rank-interleaved per-rank batches.
    sampler = DistributedSampler(train_ds, num_replicas=distributed.world(), rank=distributed.rank(), shuffle=True,
                                 seed=_epoch_seed(cfg.seed, 0))
    return _Loop(net, model, opt, train_ds, _Augmented(val, transforms.eval_transform(data_config), min_size), sampler, stage, cfg,
                 precision, layout, dev, features.default_workers() if cfg.workers < 0 else cfg.workers,
                 cfg.scratch_epochs if scratch else cfg.ft_epochs, cfg.scratch_patience if scratch else cfg.ft_patience,
                 nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), FitResult(unfrozen=unfrozen))


def fit(
    net: Net,
    train: Split,
    val: Split,
    data_config: dict[str, Any],
    cfg: TrainConfig,
    *,
    stage: str = "finetune",
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    resume_hint: str = "",
) -> FitResult:
    """Train ``net`` in place; on return it holds the best epoch's weights."""
    loop = _setup(net, train, val, data_config, cfg, stage)
    # oneDNN and MKL give the same bits only for the same thread counts: set them alike in every process, whatever
    # ran in it before (a process that fitted the head itself had MKL left at 1 thread, one that read it back not).
    torch.set_num_threads(torch.get_num_threads())
    ckpt = checkpoint_dir / CHECKPOINT if checkpoint_dir else None
    start = _resume(loop, ckpt) if resume and ckpt else 1
    if start == 1:  # epoch 0: the starting point is a candidate too, so fine-tuning can only keep or improve it
        val_loss, val_acc = evaluate_loss(net, loop.val_ds, cfg.ft_batch_size, loop.precision, loop.workers, loop.layout)
        loop.result.history.append({"stage": stage, "epoch": 0, "val_loss": val_loss, "val_accuracy": val_acc})
        loop.result.best_val_loss, loop.result.best_epoch = val_loss, 0
        loop.best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    epoch = start - 1
    try:
        with _deterministic():
            for epoch in range(start, loop.epochs + 1):
                if epoch - loop.result.best_epoch > loop.patience:
                    break
                _epoch(loop, epoch, progress)
                if ckpt and distributed.rank() == 0:
                    _save(ckpt, net, loop.opt, loop.result, loop.best_state, epoch, cfg, stage)
    except KeyboardInterrupt:
        where = f"; the checkpoint of epoch {epoch - 1} is kept — resume with: {resume_hint}" if ckpt and resume_hint else ""
        raise Interrupted(f"{stage} interrupted during epoch {epoch}{where}") from None
    if loop.best_state is not None:
        net.load_state_dict(loop.best_state)
    net.to("cpu").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return loop.result


def _resume(loop: _Loop, ckpt: Path) -> int:
    """The epoch to start from: after the checkpointed one, when there is a checkpoint (rank 0 decides, so every
    rank starts alike)."""
    if not distributed.broadcast(ckpt.is_file()):
        return 1
    if not ckpt.is_file():
        raise HeadstartError(f"rank {distributed.rank()} cannot read '{ckpt}': to resume on several machines, "
                             "put the run folder on storage every machine mounts at the same path")
    start, loop.best_state = _restore(ckpt, loop.net, loop.opt, loop.result, loop.cfg, loop.stage)
    log.info("%s: resuming after epoch %d (best so far: epoch %d)", loop.stage, start - 1, loop.result.best_epoch)
    return start


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """oneDNN may sum a backward pass's per-thread partial gradients in any order; the deterministic mode fixes
    the order, so the same seed gives the same weights (and a resumed run the uninterrupted run's result)."""
    was = getattr(torch.backends.mkldnn, "deterministic", None)  # torch >= 2.5
    if was is not None:
        torch.backends.mkldnn.deterministic = True
    try:
        yield
    finally:
        if was is not None:
            torch.backends.mkldnn.deterministic = was


def _epoch(loop: _Loop, epoch: int, progress: bool) -> None:
    """One pass over the training photos, then the validation loss; the best epoch's weights are kept."""
    cfg, t0 = loop.cfg, time.perf_counter()
    transforms.seed(_epoch_seed(cfg.seed, epoch))  # dropout
    loop.train_ds.seed = _epoch_seed(cfg.seed, epoch)
    loop.sampler.set_epoch(epoch)
    loader = DataLoader(loop.train_ds, batch_size=cfg.ft_batch_size, sampler=loop.sampler, num_workers=loop.workers,
                        collate_fn=_collate, generator=torch.Generator().manual_seed(_epoch_seed(cfg.seed, epoch)),
                        persistent_workers=False)
    loop.model.train()
    if not (loop.scratch or cfg.train_bn):
        freeze_batchnorm(loop.net)
    bar = tqdm(total=len(loop.train_ds), desc=f"{loop.stage} epoch {epoch}/{loop.epochs}", unit="img",
               disable=not (progress and distributed.rank() == 0), leave=False)
    total, correct, seen = _train_steps(loop, loader, bar)
    bar.close()
    total, correct, seen = _sum_over_ranks(total, correct, seen)
    val_loss, val_acc = evaluate_loss(loop.net, loop.val_ds, cfg.ft_batch_size, loop.precision, loop.workers, loop.layout)
    row = {"stage": loop.stage, "epoch": epoch, "train_loss": total / max(seen, 1), "train_accuracy": correct / max(seen, 1),
           "val_loss": val_loss, "val_accuracy": val_acc, "seconds": round(time.perf_counter() - t0, 2)}
    loop.result.history.append(row)
    log.info("%s epoch %d: train loss %.4f acc %.3f, val loss %.4f acc %.3f (%.1f s)", loop.stage, epoch,
             row["train_loss"], row["train_accuracy"], val_loss, val_acc, row["seconds"])
    if val_loss < loop.result.best_val_loss - 1e-4:
        loop.result.best_val_loss, loop.result.best_epoch = val_loss, epoch
        loop.best_state = {k: v.detach().clone() for k, v in loop.net.state_dict().items()}


def _train_steps(loop: _Loop, loader: DataLoader, bar: Any) -> tuple[float, int, int]:
    """The optimiser steps of one epoch; returns this rank's summed loss, correct predictions and images."""
    seen, total, correct = 0, 0.0, 0
    for batch in loader:
        if batch is None:  # the whole batch unreadable (train() passes only images that decoded)
            continue
        x, y = batch[0].to(loop.dev), batch[1].to(loop.dev)
        loop.opt.zero_grad(set_to_none=True)
        with features.autocast(loop.precision, loop.dev.type):
            logits = loop.model(x.contiguous(memory_format=loop.layout))
        loss = loop.loss_fn(logits.float(), y)
        loss.backward()
        loop.opt.step()
        seen += len(y)
        total += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        bar.update(len(y) * distributed.world())  # the ranks advance together: global images
    return total, correct, seen


def evaluate_loss(net: nn.Module, ds: torch.utils.data.Dataset, batch_size: int, precision: str, workers: int,
                  layout: torch.memory_format = torch.channels_last) -> tuple[float, float]:
    """Mean loss and accuracy over ``ds``; under torchrun each rank takes every world-th image (no padding) and
    the sums are combined in rank order, so every rank gets the same numbers and takes the same early-stopping
    decision."""
    net.eval()
    dev = next(net.parameters()).device
    shard = Subset(ds, range(distributed.rank(), len(ds), distributed.world()))
    total, correct, seen = 0.0, 0, 0
    for batch in DataLoader(shard, batch_size=batch_size, num_workers=workers, collate_fn=_collate):
        if batch is None:
            continue
        x, y = batch[0].to(dev), batch[1].to(dev)
        with torch.inference_mode(), features.autocast(precision, dev.type):
            logits = net(x.contiguous(memory_format=layout)).float()
        total += float(nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    total, correct, seen = _sum_over_ranks(total, correct, seen)
    return total / max(seen, 1), correct / max(seen, 1)


def _sum_over_ranks(*values: float) -> tuple[float, ...]:
    """Per-rank sums → global sums, added in rank order (the same float result on every rank)."""
    parts = distributed.all_gather(values)
    return tuple(sum(p[i] for p in parts) for i in range(len(values)))


# ------------------------------------------------------------------------------------------ checkpoints


def _fingerprint(cfg: TrainConfig, stage: str) -> str:
    keep = {k: v for k, v in cfg.to_dict().items() if k not in ("workers", "cache_dir", "ft_epochs", "scratch_epochs")}
    return json.dumps({"stage": stage, **keep}, sort_keys=True, default=str)


def _save(path: Path, net: Net, opt: torch.optim.Optimizer, result: FitResult, best: dict[str, torch.Tensor] | None,
          epoch: int, cfg: TrainConfig, stage: str) -> None:
    """Model, best model, optimizer tensors in safetensors; the rest as JSON metadata. Atomic."""
    tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
    if best is not None:
        tensors |= {f"best.{k}": v for k, v in best.items()}
    state = opt.state_dict()
    for idx, s in state["state"].items():
        for name, value in s.items():
            tensors[f"opt.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    meta = {"epoch": epoch, "best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss, "history": result.history,
            "param_groups": state["param_groups"], "fingerprint": _fingerprint(cfg, stage)}
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"headstart": json.dumps(meta, default=str)})


def _restore(path: Path, net: Net, opt: torch.optim.Optimizer, result: FitResult, cfg: TrainConfig, stage: str) -> tuple[int, dict[str, torch.Tensor] | None]:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["headstart"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta["fingerprint"] != _fingerprint(cfg, stage):
        raise HeadstartError(f"the checkpoint '{path}' was made with other settings; resume with the same options, or start a new run folder")
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    result.history, result.best_epoch, result.best_val_loss = meta["history"], meta["best_epoch"], meta["best_val_loss"]
    return meta["epoch"] + 1, best
