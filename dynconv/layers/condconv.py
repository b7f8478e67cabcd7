"""CondConv (Yang et al., NeurIPS 2019): sigmoid routing, one weight per expert."""

from __future__ import annotations

from typing import Annotated, ClassVar

from ..routing import SigmoidRouter
from .base import DynamicConv2d
from .registry import register
from .spec import Bounds, KindInfo


@register
class CondConv2d(DynamicConv2d):
    """Conditionally parameterised convolution: ``W(x) = sum_k sigmoid(R GAP(x))_k W_k``.

    Router options: ``dropout`` (on the pooled features feeding the router; the
    paper uses 0.1-0.2 in big models, default 0).
    """

    kind = "condconv"
    #: Sigmoid routers at 30x under SGD diverged on Fashion-MNIST (2 seeds of 3); at 1x they train as static does.
    router_lr_multipliers: ClassVar[dict[str, float]] = {"sgd": 1.0, "adam": 1.0, "trust": 1.0}
    #: Calibrated routing was CondConv's best arm on the Fashion-MNIST validation split at 20k training images
    #: (89.94% against 89.86% from uniform routing; benchmarks/results/pays.md), and it makes routing image-dependent.
    calibrates_by_default: ClassVar[bool] = True
    info = KindInfo(
        title="CondConv (Yang et al., NeurIPS 2019)",
        formula="W(x) = sum_k r_k(x) W_k",
        routing="global average pool -> linear -> sigmoid: one weight in (0, 1) per expert",
        parameters="K x the conv's kernel, plus C_in x K for the router",
        speed="mixes K full kernels per sample: near static cost on large maps and 1x1 convs, "
        "memory-bound on small maps with many channels",
    )

    def _build_router(self, dropout: Annotated[float, Bounds(ge=0, lt=1)] = 0.0) -> SigmoidRouter:
        return SigmoidRouter(self.in_channels, self.experts, dropout=dropout)
