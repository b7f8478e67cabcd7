"""Fold an eval-mode BatchNorm that follows a dynamic conv into the conv.

BatchNorm in eval mode is per channel ``y -> s * y + c`` with ``s = gamma / sqrt(var + eps)``
and ``c = beta - s * mean``. Each kind folds that affine map its own way
(:meth:`DynamicConv2d.fold_affine_`): for the expert kinds, scaling every expert's
kernel and bias scales the mixed kernel by ``s`` whatever the routing, and ``c`` goes
into the experts' biases when every input's routing weights sum to one (DyConv,
DyNet) or into a ``static_bias`` added after the mixed convolution (CondConv).
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


def fold_batchnorm_(layer: DynamicConv2d, bn: nn.BatchNorm2d) -> str:
    """Make ``layer`` compute ``bn(layer(x))`` of eval mode, in place; ``bn`` can then be dropped.

    Returns where the BatchNorm's shift went (``"bias"`` or ``"static_bias"``).
    """
    if bn.num_features != layer.out_channels:
        raise ValueError(f"the BatchNorm has {bn.num_features} channels but the conv outputs {layer.out_channels}")
    return layer.fold_affine_(*batchnorm_affine(bn))
