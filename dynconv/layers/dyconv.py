"""Dynamic Convolution (Chen et al., CVPR 2020): softmax attention with a temperature."""

from __future__ import annotations

from torch import nn

from ..routing import SoftmaxRouter
from .base import DynamicConv2d


class DyConv2d(DynamicConv2d):
    """Attention over kernels: ``W(x) = sum_k softmax(z(x) / T)_k W_k``.

    Router options: ``reduction`` (4), ``min_hidden`` (16), ``temperature`` (30, the
    paper's start; anneal it with :class:`dynconv.TemperatureSchedule`).
    """

    kind = "dyconv"

    def _build_router(self, reduction: int = 4, min_hidden: int = 16, temperature: float = 30.0) -> nn.Module:
        return SoftmaxRouter(
            self.in_channels, self.experts, reduction=reduction, min_hidden=min_hidden, temperature=temperature
        )
