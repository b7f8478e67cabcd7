"""Weight standardisation of per-sample mixed kernels, computed through the core.

Weight-standardised convs (BiT's ``StdConv2d``, NFNet's ``ScaledStdConv2d``) use
``gain * scale * (W - mean) / sqrt(var + eps)`` per output channel. For a dynamic
conv the kernel to standardise is each sample's mixture ``sum_k r_k E_k``. Its
mean and variance are linear and quadratic in the routing, so they come from the
experts' means and Gram matrix without materialising the mixtures, and

    standardise(sum_k r_k E_k) = sum_k (r_k * inv) E_k - (mean * inv) * ONES

is one more dynamic conv with per-output-channel routing and an all-ones expert.
With uniform routing the mixture is the original kernel, so a converted
standardised conv computes exactly what it did before.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class WeightStandardization:
    """How a kernel is standardised: ``gain * scale * (W - mean) / sqrt(var + eps)``.

    ``learnable_gain`` adds a per-output-channel ``gain`` parameter (NFNet); ``scale``
    is a constant (NFNet: ``gamma / sqrt(fan_in)``; BiT: 1).
    """

    eps: float = 1e-6
    scale: float = 1.0
    learnable_gain: bool = False

    def to_dict(self) -> dict[str, float | bool]:
        return asdict(self)


def standardized_routing(
    weight: Tensor, routing: Tensor, eps: float, scale: float = 1.0, gain: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Experts plus an all-ones expert, and ``[B, K + 1, C_out]`` routing that standardises."""
    experts, c_out = weight.shape[:2]
    flat = weight.reshape(experts, c_out, -1)
    means = flat.mean(-1)  # [K, C]
    gram = torch.einsum("kcn,lcn->ckl", flat, flat) / flat.shape[-1]  # [C, K, K]
    per_channel = routing if routing.dim() == 3 else routing.unsqueeze(-1).expand(-1, -1, c_out)
    mean = (per_channel * means.unsqueeze(0)).sum(1)  # [B, C]
    second = torch.einsum("bkc,ckl,blc->bc", per_channel, gram, per_channel)
    var = (second - mean * mean).clamp_min(0)  # biased, as F.batch_norm normalises
    inv = torch.rsqrt(var + eps) * scale
    if gain is not None:
        inv = inv * gain.unsqueeze(0)
    new_routing = torch.cat([per_channel * inv.unsqueeze(1), (-mean * inv).unsqueeze(1)], dim=1)
    ones = torch.ones_like(weight[:1])
    return torch.cat([weight, ones], dim=0), new_routing
