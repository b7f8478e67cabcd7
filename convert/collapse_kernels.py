"""A dynamic layer's kernel at one fixed routing, and the plain conv that holds it.

Every kind's kernel is a function of its routing: ``sum_k r_k W_k`` (CondConv, DyConv;
per output channel for DyNet), ``Lambda W0 + P Phi Q^T`` on the centre tap (DCD), and
``sum_i a_w,i a_f a_c a_s W_i`` (ODConv). At the layer's mean routing over some data
this is one static kernel: exact where the routing is constant, an approximation
elsewhere (a product of mean attentions is not the mean of their products). The
routing vectors are the ones :func:`dynconv.capture_routing` records.

The conv that holds it is of the class the layer was converted from (plain, timm's TF
'same', weight-standardised), so a checkpoint rebuilds it as the base model's conv.
A standardised layer's raw mixture goes into a standardised conv, which standardises
it as the layer did; DCD and ODConv scale a standardised kernel afterwards, which no
standardised conv can hold, so they do not collapse.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dynconv import TF_SAME, DCDConv2d, DynamicConv2d, ODConv2d
from dynconv.layers.odconv import kernel_factors


def not_collapsible(layer: DynamicConv2d) -> str | None:
    """Why ``layer`` cannot become one static conv of its original class, or ``None``."""
    if layer._modules.get("routing_share") is not None:
        return "shares its block's router with other layers"
    if layer.standardize is not None and isinstance(layer, (DCDConv2d, ODConv2d)):
        return f"{layer.kind} scales the standardised kernel, which a weight-standardised conv cannot hold"
    return None


def _mixture(layer: DynamicConv2d, routing: Tensor) -> tuple[Tensor, Tensor | None]:
    """``sum_k r_k W_k`` and ``sum_k r_k b_k`` for ``[K]`` or per-channel ``[K * C_out]`` routing."""
    r = routing.reshape(layer.experts, -1)  # [K, 1] or [K, C_out]
    weight = (r[:, :, None, None, None] * layer.weight.double()).sum(0)
    bias = None if layer.bias is None else (r * layer.bias.double()).sum(0)
    return weight, bias


def _dcd_kernel(layer: DCDConv2d, routing: Tensor) -> tuple[Tensor, Tensor | None]:
    """``Lambda W0 + P Phi Q^T`` (on the centre tap) at routing ``[Lambda (C_out), Phi (g * L * L)]``."""
    c_out, per_group, kh, kw = layer.weight.shape[1:]
    groups, latent = layer.groups, layer.router.latent
    scale, phi = routing[:c_out], routing[c_out:].reshape(groups, latent, latent)
    p = layer.p.double().reshape(groups, c_out // groups, latent)
    q = layer.q.double().reshape(groups, latent, per_group)
    weight = scale[:, None, None, None] * layer.weight[0].double()
    weight[:, :, (kh - 1) // 2, (kw - 1) // 2] += (p @ phi @ q).reshape(c_out, per_group)
    bias = None if layer.bias is None else layer.bias[0].double()
    return weight, bias


def _odconv_kernel(layer: ODConv2d, routing: Tensor) -> tuple[Tensor, Tensor | None]:
    """``sum_i a_w,i a_f a_c a_s W_i`` at routing ``[kernel (n), channel (C_in), filter?, spatial?]``."""
    heads = layer.router.head.sizes
    sizes = [layer.experts, layer.in_channels] + [heads[name] for name in ("filter", "spatial") if name in heads]
    parts = list(torch.split(routing, sizes))
    kernel, channel = parts[0], parts[1]
    filt = parts.pop(2) if "filter" in heads else None
    spatial = parts[2] if "spatial" in heads else None
    weight = (kernel[:, None, None, None, None] * layer.weight.double()).sum(0, keepdim=True)
    batch = (None if filt is None else filt[None], channel[None], None if spatial is None else spatial[None])
    for factor in kernel_factors(batch[0], batch[1], batch[2], weight, layer.groups):
        weight = weight * factor
    bias = None if layer.bias is None else (kernel[:, None] * layer.bias.double()).sum(0)
    return weight[0], bias


def kernel_at(layer: DynamicConv2d, routing: Tensor) -> tuple[Tensor, Tensor | None]:
    """The layer's ``(kernel, bias)`` at one routing vector (as captured, without the batch), in float64."""
    routing = routing.detach().to(device=layer.weight.device, dtype=torch.float64).reshape(-1)
    if isinstance(layer, DCDConv2d):
        weight, bias = _dcd_kernel(layer, routing)
    elif isinstance(layer, ODConv2d):
        weight, bias = _odconv_kernel(layer, routing)
    else:
        weight, bias = _mixture(layer, routing)
    if layer.static_bias is not None:  # a folded BatchNorm's shift: constant, so it joins the bias
        bias = layer.static_bias.double() if bias is None else bias + layer.static_bias.double()
    return weight, bias


def _conv_class(layer: DynamicConv2d) -> nn.Conv2d:
    """An empty conv of the class ``layer`` was converted from, with its geometry."""
    args = (layer.in_channels, layer.out_channels, layer.kernel_size)
    geometry = {"stride": layer.stride, "dilation": layer.dilation, "groups": layer.groups}
    factory = {"device": layer.weight.device, "dtype": layer.weight.dtype}
    has_bias = layer.bias is not None or layer.static_bias is not None
    tf_same, std = layer.padding == TF_SAME, layer.standardize
    if std is None and not tf_same:
        return nn.Conv2d(
            *args, padding=layer.padding, **geometry, bias=has_bias, padding_mode=layer.padding_mode, **factory
        )
    from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame

    padding = {"padding": "SAME"} if tf_same else {"padding": layer.padding}
    if std is None:
        return Conv2dSame(*args, **geometry, bias=has_bias, **factory)
    if not std.learnable_gain:
        cls = StdConv2dSame if tf_same else StdConv2d
        return cls(*args, **padding, **geometry, bias=has_bias, eps=std.eps, **factory)
    cls = ScaledStdConv2dSame if tf_same else ScaledStdConv2d
    conv = cls(*args, **padding, **geometry, bias=has_bias, eps=std.eps, **factory)
    conv.scale = std.scale
    return conv


def collapsed_conv(layer: DynamicConv2d, routing: Tensor) -> nn.Conv2d:
    """The static conv (of the layer's original class) computing ``layer`` at the fixed ``routing``."""
    reason = not_collapsible(layer)
    if reason is not None:
        raise ValueError(f"this layer cannot collapse: it {reason}")
    weight, bias = kernel_at(layer, routing)
    conv = _conv_class(layer)
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype))
        if bias is not None:
            conv.bias.copy_(bias.to(conv.bias.dtype))
        if getattr(conv, "gain", None) is not None:
            conv.gain.copy_(layer.gain.detach().reshape(conv.gain.shape))
    return conv.train(layer.training)
