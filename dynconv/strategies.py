"""The ways to compute a batch of per-sample convolutions (:mod:`dynconv.choice` picks one per call).

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

Inputs reach a strategy validated: ``x`` is ``[B, C_in, H, W]``, ``weight`` is
``[K, C_out, C_in // groups, kH, kW]``, ``routing`` is ``[B, K]`` or
``[B, K, C_out]`` in the weight's dtype, ``bias`` is ``None`` or ``[K, C_out]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .geometry import ConvGeometry

StrategyFn = Callable[..., Tensor]


@dataclass(frozen=True)
class KernelTerms:
    """What turns each sample's mixed kernel into its final kernel: ``mixed * prod(factors) + offset``.

    ``factors`` are per-sample ``[B, ...]`` tensors broadcastable to ``[B, C_out, C_in/g, kH, kW]``;
    ``offset`` is ``[B, C_out, C_in/g, kH, kW]`` or ``None``.
    """

    factors: tuple[Tensor, ...] = ()
    offset: Tensor | None = None

    def __bool__(self) -> bool:
        return bool(self.factors) or self.offset is not None

    def rows(self, start: int, stop: int) -> KernelTerms:
        """The terms of samples ``start:stop``."""
        offset = None if self.offset is None else self.offset[start:stop]
        return KernelTerms(tuple(f[start:stop] for f in self.factors), offset)


NO_TERMS = KernelTerms()


def mix_kernels(weight: Tensor, routing: Tensor, terms: KernelTerms = NO_TERMS) -> Tensor:
    """Per-sample kernels ``[B, C_out, C_in/g, kH, kW]`` from ``K`` experts, then the ``terms``.

    With one expert the routing is just one more per-sample factor: the kernel is
    scaled once (no matrix product, no copy before the scaling).
    """
    k, c_out = weight.shape[:2]
    if k == 1:
        factor = routing.reshape(-1, 1, 1, 1, 1) if routing.dim() == 2 else routing.reshape(-1, c_out, 1, 1, 1)
        for extra in terms.factors:
            factor = factor * extra
        mixed = weight * factor
        return mixed if terms.offset is None else mixed + terms.offset
    if routing.dim() == 2:
        mixed = routing @ weight.reshape(k, -1)
    else:  # per output channel: K multiply-adds give a contiguous result (einsum's is o-major, 4x slower to convolve)
        experts = weight.reshape(k, 1, c_out, -1)
        mixed = routing[:, 0, :, None] * experts[0]
        for i in range(1, k):
            mixed.addcmul_(routing[:, i, :, None], experts[i])
    mixed = mixed.reshape(-1, *weight.shape[1:])  # -1: an exported graph keeps the batch dynamic
    if terms.factors:
        scale = terms.factors[0]
        for extra in terms.factors[1:]:  # small factors first: one full-size product at most
            scale = scale * extra
        mixed = mixed * scale
    return mixed if terms.offset is None else mixed + terms.offset


def mix_bias(bias: Tensor | None, routing: Tensor) -> Tensor | None:
    """Per-sample bias ``[B, C_out]`` mixed with the same routing as the kernels."""
    if bias is None:
        return None
    if routing.dim() == 2:
        return routing @ bias
    return (routing * bias.unsqueeze(0)).sum(1)


def add_bias(out: Tensor, biases: Tensor | None) -> Tensor:
    """Add a per-sample bias ``[B, C_out]`` in the output's dtype (autocast may differ)."""
    return out if biases is None else out + biases.to(out.dtype)[:, :, None, None]


def _pad(x: Tensor, geom: ConvGeometry) -> Tensor:
    return F.pad(x, geom.pad) if any(geom.pad) else x


def plain_conv(x: Tensor, w: Tensor, b: Tensor | None, geom: ConvGeometry, groups: int) -> Tensor:
    """``F.conv2d`` with the geometry's padding, padding explicitly only when asymmetric."""
    if geom.symmetric:
        return F.conv2d(x, w, b, geom.stride, geom.conv_padding, geom.dilation, groups)
    return F.conv2d(_pad(x, geom), w, b, geom.stride, 0, geom.dilation, groups)


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


def fold_chunk(batch: int, kernel_bytes: int, needs_grad: bool) -> int:
    """Samples folded into one grouped conv: enough for weight reuse, few enough that the
    mixed kernels (``chunk * kernel_bytes``) stay cache-sized instead of streaming memory."""
    cap = FOLD_MAX_CHUNK_GRAD if needs_grad else FOLD_MAX_CHUNK
    return max(1, min(batch, cap, FOLD_BUDGET_BYTES // max(kernel_bytes, 1)))


# Measured on the 2-core CPU (benchmarks/core.py): mixing all B kernels at once
# streams B * |W| bytes through memory (302 MB for ResNet-18 layer4 at batch 32) and
# costs more than the convolution; chunks of about 20 MB stay in cache.
FOLD_BUDGET_BYTES = 20 * 2**20
FOLD_MAX_CHUNK = 8
FOLD_MAX_CHUNK_GRAD = 16


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


def pointwise_conv(x: Tensor, kernels: Tensor, biases: Tensor | None, geom: ConvGeometry) -> Tensor:
    """A 1x1 conv as matrix products: ``kernels`` per sample (``[B, C_out, C_in/g]``) or one for
    the batch (``[C_out, C_in/g]``), ``biases`` ``[B, C_out]`` or ``None``. On this CPU a 1x1
    conv runs faster as a matmul than through ``F.conv2d`` (benchmarks/results/core.md)."""
    x = _pad(x, geom)
    if geom.stride != (1, 1):
        x = x[:, :, :: geom.stride[0], :: geom.stride[1]]
    batch, c_in, height, width = x.shape
    if kernels.dim() == 2:  # one kernel for the batch: a stride-0 batch, still one bmm (no transposed copies)
        kernels = kernels.expand(batch, *kernels.shape)
    c_out = kernels.shape[1]
    g = geom.groups
    if g == 1 and is_channels_last(x):
        pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, c_in)
        kt = kernels.transpose(1, 2)
        out = pixels @ kt if biases is None else torch.baddbmm(biases.unsqueeze(1), pixels, kt)
        return out.reshape(batch, height, width, c_out).permute(0, 3, 1, 2)
    if g == 1:
        cols = x.reshape(batch, c_in, height * width)
        out = kernels @ cols if biases is None else torch.baddbmm(biases.unsqueeze(2), kernels, cols)
        return out.reshape(batch, c_out, height, width)
    cols = x.reshape(batch, g, c_in // g, height * width)
    out = kernels.reshape(batch, g, c_out // g, c_in // g) @ cols
    return add_bias(out.reshape(batch, c_out, height, width), biases)


def unfold(
    x: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, geom: ConvGeometry, terms: KernelTerms = NO_TERMS
) -> Tensor:
    """im2col (``F.unfold``) then a batched matrix product with the per-sample kernels."""
    x = _pad(x, geom)
    batch = x.shape[0]
    h_out, w_out = _unpadded_out(x, geom)
    cols = F.unfold(x, geom.kernel, dilation=geom.dilation, stride=geom.stride)  # [B, C_in*kk, L]
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


def _unpadded_out(x: Tensor, geom: ConvGeometry) -> tuple[int, int]:
    """Output size of ``x`` that has already been padded."""
    unpadded = ConvGeometry(geom.kernel, geom.stride, geom.dilation, (0, 0, 0, 0), geom.groups)
    return unpadded.output_size(x.shape[2], x.shape[3])


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


def is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


STRATEGIES: dict[str, StrategyFn] = {
    "single": single,
    "loop": loop,
    "grouped": grouped,
    "matmul": matmul,
    "unfold": unfold,
    "output": output,
}

#: Strategies whose graph does not depend on the batch size: inside
#: ``strategy_scope(*EXPORTABLE_STRATEGIES)`` an ONNX export keeps the batch axis dynamic.
EXPORTABLE_STRATEGIES = ("matmul", "unfold", "output")
