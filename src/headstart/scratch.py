"""The from-scratch baseline: a small CNN trained from random initialisation, to show what transfer buys."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ScratchCNN(nn.Module):
    """The classic small CNN (three conv → BN → ReLU → max-pool blocks, global pooling), to show what transfer buys.

    It speaks timm's feature interface (forward_features / forward_head / num_features) so the rest of headstart
    treats it like any backbone.
    """

    pretrained_cfg = {
        "input_size": (3, 128, 128), "interpolation": "bilinear", "crop_pct": 0.875, "crop_mode": "center",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "classifier": "classifier",
    }

    def __init__(self, num_classes: int = 0, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in widths:
            layers.append(nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True), nn.MaxPool2d(2)))
            c_in = c
        self.blocks = nn.Sequential(*layers)
        self.num_features = c_in
        self.num_classes = num_classes
        self.classifier: nn.Module = nn.Linear(c_in, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return {"blocks": r"^blocks\.(\d+)"}
