"""DyNet (Zhang et al., 2020): coefficients per expert and per output channel."""

from __future__ import annotations

from ..routing import ChannelRouter
from .base import DynamicConv2d
from .spec import KindInfo


class DyNetConv2d(DynamicConv2d):
    """``W(x)[o] = sum_k softmax_k(A GAP(x))[k, o] W_k[o]``: routing ``[B, K, C_out]``.

    No router options.
    """

    kind = "dynet"
    info = KindInfo(
        title="DyNet (Zhang et al., 2020)",
        formula="W(x)[o] = sum_k pi_k,o(x) W_k[o]: per expert and per output channel",
        routing="global average pool -> linear -> K x C_out coefficients, softmax over the experts",
        parameters="K x the conv's kernel, plus C_in x K x C_out for the router (large on wide layers)",
        speed="mixes K full kernels per sample, per output channel",
    )

    def _build_router(self) -> ChannelRouter:
        return ChannelRouter(self.in_channels, self.out_channels, self.experts)
