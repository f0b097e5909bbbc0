"""The new head as a torch module, for the code that trains or differentiates it: the MLP head's fit,
fine-tuning, Grad-CAM, export.

Everywhere a head is only applied (evaluation, prediction from features, bundles) its weights travel as plain
arrays keyed like this module's state dict (``predict.head_logits``), so a re-run on cached features never pays
for importing torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from .data import HeadstartError

HeadState = dict[str, np.ndarray]


class Standardize(nn.Module):
    """Per-feature (x - mean) / std, stored in the head so a bundle needs nothing else."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def make_head(kind: str, dim: int, n_classes: int, hidden: int = 256, dropout: float = 0.5) -> nn.Sequential:
    """The new classifier on pooled features: the classic Dense(hidden, ReLU) → dropout → softmax, or linear."""
    if kind == "mlp":
        return nn.Sequential(
            Standardize(dim), nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, n_classes)
        )
    if kind == "linear":
        return nn.Sequential(Standardize(dim), nn.Linear(dim, n_classes))
    raise HeadstartError(f"unknown head '{kind}': use mlp or linear")


def to_module(spec: dict[str, Any], n_classes: int, state: HeadState) -> nn.Sequential:
    """The module for a head recorded as ``spec`` (a bundle's ``head`` entry: kind, dim, hidden, dropout)."""
    head = make_head(spec["kind"], spec["dim"], n_classes, spec.get("hidden", 256), spec.get("dropout", 0.5))
    head.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state.items()}, strict=True)
    return head.eval()


def to_arrays(head: nn.Module) -> HeadState:
    return {k: v.detach().cpu().float().contiguous().numpy().copy() for k, v in head.state_dict().items()}
