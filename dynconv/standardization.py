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

import math
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


def standardized_bank(weight: Tensor, eps: float, scale: Tensor) -> Tensor:
    """Each expert of ``[K, C_out, ...]`` standardised per output channel (biased variance), times ``scale [C_out]``."""
    flat = weight.flatten(2)
    mean = flat.mean(-1, keepdim=True)
    var = flat.var(-1, correction=0, keepdim=True)
    out = (flat - mean) * torch.rsqrt(var + eps) * scale.reshape(1, -1, 1).to(flat.dtype)
    return out.reshape(weight.shape)


def standardized_upcycle(weight: Tensor, experts: int, noise: float, seed: int, eps: float) -> tuple[Tensor, Tensor]:
    """Experts ``W + eps_i`` whose standardisations average to ``std(W) / factor``, and that ``factor [C_out]``.

    Standardisation is nonlinear, so ``upcycle``'s zero-sum noise would not average out.
    Here each ``eps_i`` has zero mean per output channel, is orthogonal to the channel's
    centred kernel, and all have the same variance ``s^2 = (noise * std)^2`` per channel
    (orthonormal directions placed at the vertices of a centred simplex, so they also sum
    to zero). Every expert then standardises with the same ``sqrt(v + s^2 + eps)``, and
    their mean is ``std(W) * sqrt((v + eps) / (v + s^2 + eps))``: ``factor`` is its inverse.
    A channel with fewer than ``experts + 1`` weights gets no noise (factor 1).
    """
    w = weight.detach().to("cpu", torch.float64)
    c_out = w.shape[0]
    flat = w.reshape(c_out, -1)
    fan = flat.shape[1]
    centred = flat - flat.mean(1, keepdim=True)
    var = centred.pow(2).mean(1)
    stacked = flat.unsqueeze(0).repeat(experts, 1, 1)
    factor = torch.ones(c_out, dtype=torch.float64)
    if noise > 0 and 1 < experts < fan:
        gen = torch.Generator().manual_seed(seed)
        drawn = torch.randn(c_out, fan, experts - 1, generator=gen, dtype=torch.float32).double()
        basis = torch.cat([torch.ones_like(centred).unsqueeze(-1), centred.unsqueeze(-1), drawn], dim=2)
        directions = torch.linalg.qr(basis).Q[:, :, 2:]  # orthonormal, orthogonal to 1 and to W - mean
        corners = torch.cat([torch.ones(experts, 1), torch.eye(experts)[:, : experts - 1]], dim=1).double()
        simplex = torch.linalg.qr(corners).Q[:, 1:] * math.sqrt(experts / (experts - 1))  # rows of norm 1, sum 0
        sigma = noise * var.sqrt()
        stacked = stacked + torch.einsum("ij,cfj->icf", simplex, directions) * (sigma * math.sqrt(fan))[None, :, None]
        factor = ((var + sigma**2 + eps) / (var + eps)).sqrt()
    return stacked.reshape(experts, *w.shape).to(weight.device, weight.dtype), factor.to(weight.device, weight.dtype)
