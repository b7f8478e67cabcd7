"""The ways to compute a batch of per-sample convolutions (:mod:`dynconv.core.rules` picks one per call).

Every strategy computes ``y[b] = conv(x[b], sum_k r[b,k] W[k]) + sum_k r[b,k] bias[k]``
(per output channel when routing is ``[B, K, C_out]``). They differ only in speed,
memory and exportability, which is why the core picks one per call:

- ``single``:  batch of one, a plain convolution with the mixed kernel.
- ``loop``:    one convolution per sample.
- ``grouped``: the batch folded into the groups of one convolution (timm's trick);
               as fast as a static conv on large maps, its ``groups`` bakes in the batch.
- ``matmul``:  1x1 kernels as a batched matrix product, no unfolding needed.
- ``unfold``:  im2col + batched matrix product for any kernel.
- ``output``:  one static conv with all ``K * C_out`` filters, then the outputs mixed;
               ``K`` times the MACs but no per-sample kernels, and exportable.

A call may also carry :class:`KernelTerms`: per-sample factors, each broadcastable to
``[B, C_out, C_in/g, kH, kW]``, multiplied into every sample's mixed kernel (ODConv's
attentions over output channels, input channels and kernel taps), and a per-sample
kernel added after them (DCD's low-rank term on 1x1 convs). Every strategy that forms
per-sample kernels takes them; ``output`` mixes outputs, not kernels, so it cannot.

Each is registered in the table of forms (:mod:`dynconv.core.forms`) with its
capabilities, which is all the choice, the scopes and export know of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import ConvGeometry
from .forms import Form, register_form
from .kernels import (
    NO_TERMS,
    KernelTerms,
    add_bias,
    im2col,
    mix_bias,
    mix_kernels,
    pad_input,
    plain_conv,
    pointwise_conv,
    unpadded_output_size,
)
from .rules import fold_chunk


def single(
    x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, geom: ConvGeometry, terms: KernelTerms = NO_TERMS
) -> Tensor:
    """Batch of one: mix the kernel once and run one ordinary convolution."""
    mixed_b = mix_bias(bias, routing)  # reshape, not [0]: an exported graph then has no Gather
    kernel = mix_kernels(weight, routing, terms).reshape(weight.shape[1:])
    return plain_conv(x, kernel, None if mixed_b is None else mixed_b.reshape(-1), geom, geom.groups)


def loop(
    x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, geom: ConvGeometry, terms: KernelTerms = NO_TERMS
) -> Tensor:
    """One convolution per sample: the reference-shaped strategy, moderate on small maps."""
    kernels = mix_kernels(weight, routing, terms)
    biases = mix_bias(bias, routing)
    outs = [
        plain_conv(x[b : b + 1], kernels[b], None if biases is None else biases[b], geom, geom.groups)
        for b in range(x.shape[0])
    ]
    return torch.cat(outs, 0)


def grouped(
    x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, geom: ConvGeometry, terms: KernelTerms = NO_TERMS
) -> Tensor:
    """Fold chunks of the batch into the groups of one convolution (``groups = chunk * groups``)."""
    batch, c_in, height, width = x.shape
    c_out = weight.shape[1]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, routing, bias))
    chunk = fold_chunk(batch, weight[0].numel() * weight.element_size(), needs_grad)
    outs = []
    for start in range(0, batch, chunk):
        r = routing[start : start + chunk]
        n = r.shape[0]
        kernels = mix_kernels(weight, r, terms.rows(start, start + n))
        biases = mix_bias(bias, r)
        out = plain_conv(
            x[start : start + n].reshape(1, n * c_in, height, width),
            kernels.reshape(n * c_out, *kernels.shape[2:]),
            None if biases is None else biases.reshape(-1),
            geom,
            n * geom.groups,
        )
        outs.append(out.reshape(n, c_out, out.shape[-2], out.shape[-1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, 0)


def matmul(
    x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, geom: ConvGeometry, terms: KernelTerms = NO_TERMS
) -> Tensor:
    """1x1 kernels as batched matrix products; channels_last inputs stay channels_last."""
    if not geom.pointwise:
        raise ValueError(f"strategy 'matmul' needs a 1x1 kernel, got {geom.kernel}")
    kernels = mix_kernels(weight, routing, terms).flatten(2)  # [B, C_out, C_in/g]
    return pointwise_conv(x, kernels, mix_bias(bias, routing), geom)


def unfold(
    x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, geom: ConvGeometry, terms: KernelTerms = NO_TERMS
) -> Tensor:
    """im2col (``F.unfold``) then a batched matrix product with the per-sample kernels."""
    x = pad_input(x, geom)
    batch = x.shape[0]
    h_out, w_out = unpadded_output_size(x, geom)
    cols = im2col(x, geom)  # [B, C_in*kk, L]
    kernels = mix_kernels(weight, routing, terms).flatten(2)  # [B, C_out, C_in/g*kk]
    c_out = kernels.shape[1]
    biases = mix_bias(bias, routing)
    g = geom.groups
    if g == 1:
        out = kernels @ cols if biases is None else torch.baddbmm(biases.unsqueeze(2), kernels, cols)
        return out.reshape(batch, c_out, h_out, w_out)
    cols = cols.reshape(batch, g, cols.shape[1] // g, cols.shape[2])
    out = (kernels.reshape(batch, g, c_out // g, kernels.shape[2]) @ cols).reshape(batch, c_out, h_out, w_out)
    return add_bias(out, biases)


def output(x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
    """All ``K * C_out`` filters in one static conv, then outputs mixed by the routing."""
    k, c_out = weight.shape[:2]
    g = geom.groups
    # Reorder so each group's K * C_out/g filters are contiguous, as grouped conv needs.
    filters = weight.reshape(k, g, c_out // g, *weight.shape[2:]).transpose(0, 1).reshape(k * c_out, *weight.shape[2:])
    y = pointwise_conv(x, filters.flatten(1), None, geom) if geom.pointwise else plain_conv(x, filters, None, geom, g)
    y = y.unflatten(1, (g, k, c_out // g))  # [B, g, K, C_out/g, H', W']
    batch = x.shape[0]
    if routing.dim() == 2:
        r = routing.reshape(batch, 1, k, 1, 1, 1)
    else:
        r = routing.reshape(batch, k, g, c_out // g).transpose(1, 2).unsqueeze(-1).unsqueeze(-1)
    weighted = y * r.to(y.dtype)
    out = (weighted.squeeze(2) if k == 1 else weighted.sum(2)).flatten(1, 2)  # one expert: nothing to sum
    return add_bias(out, mix_bias(bias, routing))


for _form in (
    Form("single", single, per_sample_kernels=True, batch_agnostic=False, batch_one_only=True),
    Form("loop", loop, per_sample_kernels=True, batch_agnostic=False),
    Form("grouped", grouped, per_sample_kernels=True, batch_agnostic=False),
    Form("matmul", matmul, per_sample_kernels=True, batch_agnostic=True, pointwise_only=True),
    Form("unfold", unfold, per_sample_kernels=True, batch_agnostic=True),
    Form("output", output, per_sample_kernels=False, batch_agnostic=True, takes_terms=False),
):
    register_form(_form)
