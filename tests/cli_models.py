"""Small custom models for CLI tests, importable as ``cli_models:FACTORY``."""

from __future__ import annotations

import torch
from torch import nn


def small_net(width: int = 8) -> nn.Module:
    """A deterministic conv net: converts exactly."""
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, 4),
    )


class NoisyNet(nn.Module):
    """Adds fresh noise in every forward, so no conversion can match it: verification must fail."""

    def __init__(self) -> None:
        super().__init__()
        self.body = small_net()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + torch.rand(x.shape[0], 4)


def noisy_net() -> nn.Module:
    return NoisyNet()


class SmallClassifier(nn.Module):
    """A custom model with its head under ``fc``, as torchvision's are: ``--num-classes`` can replace it."""

    def __init__(self, num_classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
        )
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def small_classifier() -> nn.Module:
    return SmallClassifier()
