"""DyNet (Zhang et al., 2020): coefficients per expert and per output channel."""

from __future__ import annotations

from torch import nn

from ..routing import ChannelRouter
from .base import DynamicConv2d


class DyNetConv2d(DynamicConv2d):
    """``W(x)[o] = sum_k softmax_k(A GAP(x))[k, o] W_k[o]``: routing ``[B, K, C_out]``.

    No router options.
    """

    kind = "dynet"

    def _build_router(self) -> nn.Module:
        return ChannelRouter(self.in_channels, self.out_channels, self.experts)
