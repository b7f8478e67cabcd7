"""CondConv (Yang et al., NeurIPS 2019): sigmoid routing, one weight per expert."""

from __future__ import annotations

from torch import nn

from ..routing import SigmoidRouter
from .base import DynamicConv2d


class CondConv2d(DynamicConv2d):
    """Conditionally parameterised convolution: ``W(x) = sum_k sigmoid(R GAP(x))_k W_k``.

    Router options: ``dropout`` (on the pooled features feeding the router; the
    paper uses 0.1-0.2 in big models, default 0).
    """

    kind = "condconv"

    def _build_router(self, dropout: float = 0.0) -> nn.Module:
        return SigmoidRouter(self.in_channels, self.experts, dropout=dropout)
