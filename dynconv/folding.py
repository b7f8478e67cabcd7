"""Fold an eval-mode BatchNorm that follows a dynamic conv into the conv's experts.

BatchNorm in eval mode is per channel ``y -> s * y + c`` with ``s = gamma / sqrt(var + eps)``
and ``c = beta - s * mean``. Scaling every expert's kernel and bias by ``s`` scales the
mixed kernel by ``s`` whatever the routing, so ``s`` folds exactly. The shift ``c`` folds
into the experts' biases only when every input's routing weights sum to one (softmax:
DyConv, DyNet); CondConv's sigmoid weights do not, so there ``c`` becomes the layer's
``static_bias``, added after the mixed convolution.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers.base import DynamicConv2d


def batchnorm_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` per channel, in float64, that an eval-mode ``bn`` applies."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("the BatchNorm keeps no running statistics, so its eval-mode effect is not a constant affine")
    mean = bn.running_mean.detach().double()
    scale = torch.rsqrt(bn.running_var.detach().double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().double()
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().double()
    return scale, shift


def fold_batchnorm_(layer: DynamicConv2d, bn: nn.BatchNorm2d) -> DynamicConv2d:
    """Make ``layer`` compute ``bn(layer(x))`` of eval mode, in place; ``bn`` can then be dropped."""
    if layer.standardize is not None:
        raise ValueError("a weight-standardised layer renormalises its kernel, which would undo a folded scale")
    if bn.num_features != layer.out_channels:
        raise ValueError(f"the BatchNorm has {bn.num_features} channels but the conv outputs {layer.out_channels}")
    scale, shift = batchnorm_affine(bn)
    weight = layer.weight.detach()
    with torch.no_grad():
        layer.weight.copy_((weight.double() * scale.view(1, -1, 1, 1, 1)).to(weight.dtype))
        bias = None if layer.bias is None else layer.bias.detach().double() * scale
        static = None if layer.static_bias is None else layer.static_bias.detach().double() * scale
        if layer.router.sums_to_one:  # sum_k r_k (b_k + c) = sum_k r_k b_k + c for every input
            bias = shift.expand(layer.experts, -1) if bias is None else bias + shift
        else:
            static = shift if static is None else static + shift
        factory = {"dtype": weight.dtype, "device": weight.device}
        if bias is not None and layer.bias is None:
            layer.bias = nn.Parameter(bias.to(**factory).contiguous())
        elif bias is not None:
            layer.bias.copy_(bias)
        if static is not None:
            layer.static_bias = nn.Parameter(static.to(**factory))
    return layer
