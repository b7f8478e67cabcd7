"""The definition the core must match: one ``F.conv2d`` per sample with its mixed kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def per_sample_conv(
    x: Tensor,
    weight: Tensor,
    routing: Tensor,
    bias: Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
) -> Tensor:
    """``y[b] = F.conv2d(x[b:b+1], sum_k r[b,k] W[k], sum_k r[b,k] bias[k])``, written plainly."""
    outs = []
    for b in range(x.shape[0]):
        if routing.dim() == 2:
            r_w = routing[b].reshape(-1, 1, 1, 1, 1)
            r_b = routing[b].reshape(-1, 1)
        else:  # [B, K, C_out]: one coefficient per expert and output channel
            r_w = routing[b].reshape(*routing.shape[1:], 1, 1, 1)
            r_b = routing[b]
        kernel = (r_w * weight).sum(0)
        mixed_bias = None if bias is None else (r_b * bias).sum(0)
        outs.append(F.conv2d(x[b : b + 1], kernel, mixed_bias, stride, padding, dilation, groups))
    return torch.cat(outs, 0)


def close_enough(actual: Tensor, expected: Tensor) -> bool:
    """The contract's tolerance: max |diff| <= 1e-4 * max |expected| + 1e-5."""
    diff = (actual.float() - expected.float()).abs().max().item()
    return diff <= 1e-4 * expected.float().abs().max().item() + 1e-5
