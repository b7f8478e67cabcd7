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
