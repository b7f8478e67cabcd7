"""Dynamic Convolution (Chen et al., CVPR 2020): softmax attention with a temperature."""

from __future__ import annotations

from typing import Annotated

from ..routing import SoftmaxRouter
from .base import DynamicConv2d
from .registry import register
from .spec import Bounds, KindInfo


@register
class DyConv2d(DynamicConv2d):
    """Attention over kernels: ``W(x) = sum_k softmax(z(x) / T)_k W_k``.

    Router options: ``reduction`` (4), ``min_hidden`` (16), ``temperature`` (30, the
    paper's start; anneal it with :class:`dynconv.TemperatureSchedule`).
    """

    kind = "dyconv"
    temperature_annealing = (30.0, 1.0)  # the paper's: 30 -> 1 over the first epochs
    info = KindInfo(
        title="Dynamic Convolution (Chen et al., CVPR 2020)",
        formula="W(x) = sum_k softmax(z(x) / T)_k W_k, bias likewise",
        routing="global average pool -> linear (/reduction) -> ReLU -> linear -> softmax over experts, "
        "temperature T annealed 30 -> 1",
        parameters="K x the conv's kernel, plus a small two-layer router",
        speed="mixes K full kernels per sample, as CondConv",
    )

    def _build_router(
        self,
        reduction: Annotated[int, Bounds(ge=1)] = 4,
        min_hidden: Annotated[int, Bounds(ge=1)] = 16,
        temperature: Annotated[float, Bounds(gt=0)] = 30.0,
    ) -> SoftmaxRouter:
        return SoftmaxRouter(
            self.in_channels, self.experts, reduction=reduction, min_hidden=min_hidden, temperature=temperature
        )
