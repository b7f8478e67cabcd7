"""Every kind's per-sample kernel written out from its formula, to measure how far a training step moves it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import dynconv


def effective_kernel(layer: nn.Module, x: Tensor) -> Tensor:
    """``[B, C_out, C_in/g, kH, kW]``: the kernel ``layer`` applies to each sample of ``x`` (a conv's, repeated)."""
    if isinstance(layer, dynconv.ODConv2d):
        kernel, filt, channel, spatial = layer.router(x)
        c_out, per_group, kh, kw = layer.weight.shape[1:]
        mixed = torch.einsum("bk,kocij->bocij", kernel, layer.weight)
        in_attention = channel.reshape(-1, layer.groups, 1, per_group).expand(-1, -1, c_out // layer.groups, -1)
        mixed = mixed * in_attention.reshape(-1, c_out, per_group, 1, 1)
        if filt is not None:
            mixed = mixed * filt.reshape(-1, c_out, 1, 1, 1)
        if spatial is not None:
            mixed = mixed * spatial.reshape(-1, 1, 1, kh, kw)
        return mixed
    if isinstance(layer, dynconv.DCDConv2d):
        scale, phi = layer.router(x)
        groups, latent = layer.groups, phi.shape[-1]
        c_out, per_group, kh, kw = layer.weight.shape[1:]
        low = layer.p.reshape(groups, c_out // groups, latent) @ phi @ layer.q.reshape(groups, latent, per_group)
        offset = F.pad(
            low.reshape(-1, c_out, per_group, 1, 1),
            ((kw - 1) // 2, kw - 1 - (kw - 1) // 2, (kh - 1) // 2, kh - 1 - (kh - 1) // 2),
        )
        return scale.reshape(-1, c_out, 1, 1, 1) * layer.weight[0] + offset
    if isinstance(layer, dynconv.DynamicConv2d):
        routing = layer.route(x)
        if routing.dim() == 2:
            return torch.einsum("bk,kocij->bocij", routing, layer.weight)
        return torch.einsum("bko,kocij->bocij", routing, layer.weight)
    return layer.weight.unsqueeze(0).expand(x.shape[0], *layer.weight.shape)
