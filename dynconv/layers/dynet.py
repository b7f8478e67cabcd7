"""DyNet (Zhang et al., 2020): coefficients per expert and per output channel."""

from __future__ import annotations

from typing import Annotated

from ..routing import ChannelRouter
from .base import DynamicConv2d
from .registry import register
from .spec import Bounds, KindInfo


@register
class DyNetConv2d(DynamicConv2d):
    """``W(x)[o] = sum_k softmax_k(A GAP(x))[k, o] W_k[o]``: routing ``[B, K, C_out]``.

    Router option ``reduction``: ``None`` (the default, the paper's form) maps the
    pooled input straight to the ``K x C_out`` coefficients with one linear layer,
    ``C_in x K x C_out`` parameters (26.5M on MobileNetV2); a number puts a bottleneck
    of ``max(C_in / reduction, min_hidden)`` units with a ReLU in front, as DyConv's.
    """

    kind = "dynet"
    routing_unshareable = (
        "routes per output channel (coefficients for this conv's own output channels), which no other conv can use"
    )
    info = KindInfo(
        title="DyNet (Zhang et al., 2020)",
        formula="W(x)[o] = sum_k pi_k,o(x) W_k[o]: per expert and per output channel",
        routing="global average pool -> linear -> K x C_out coefficients, softmax over the experts",
        parameters="K x the conv's kernel, plus C_in x K x C_out for the router (large on wide layers; "
        "reduction=r makes it C_in^2 / r + C_in / r x K x C_out)",
        speed="mixes K full kernels per sample, per output channel",
    )

    def _build_router(
        self,
        reduction: Annotated[int | None, Bounds(ge=1)] = None,
        min_hidden: Annotated[int, Bounds(ge=1)] = 16,
    ) -> ChannelRouter:
        return ChannelRouter(
            self.in_channels, self.out_channels, self.experts, reduction=reduction, min_hidden=min_hidden
        )
