"""The building blocks every form shares: mixing kernels and biases, padding, a plain conv, a 1x1 matmul.

Inputs reach them validated: ``x`` is ``[B, C_in, H, W]``, ``weight`` is
``[K, C_out, C_in // groups, kH, kW]``, ``routing`` is ``[B, K]`` or ``[B, K, C_out]`` in
the weight's dtype, ``bias`` is ``None`` or ``[K, C_out]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..geometry import ConvGeometry


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


def pad_input(x: Tensor, geom: ConvGeometry) -> Tensor:
    return F.pad(x, geom.pad) if any(geom.pad) else x


def plain_conv(x: Tensor, w: Tensor, b: Tensor | None, geom: ConvGeometry, groups: int) -> Tensor:
    """``F.conv2d`` with the geometry's padding, padding explicitly only when asymmetric."""
    if geom.symmetric:
        return F.conv2d(x, w, b, geom.stride, geom.conv_padding, geom.dilation, groups)
    return F.conv2d(pad_input(x, geom), w, b, geom.stride, 0, geom.dilation, groups)


def pointwise_conv(x: Tensor, kernels: Tensor, biases: Tensor | None, geom: ConvGeometry) -> Tensor:
    """A 1x1 conv as matrix products: ``kernels`` per sample (``[B, C_out, C_in/g]``) or one for
    the batch (``[C_out, C_in/g]``), ``biases`` ``[B, C_out]`` or ``None``. On this CPU a 1x1
    conv runs faster as a matmul than through ``F.conv2d`` (benchmarks/results/core.md)."""
    x = pad_input(x, geom)
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


def im2col(x: Tensor, geom: ConvGeometry) -> Tensor:
    """``F.unfold`` of an already padded ``x``: ``[B, C_in * kH * kW, L]``, channel-major as ``F.unfold`` orders it.

    In an export it is a static conv with one-hot filters (``groups = C_in``), which ONNX
    Runtime runs as one pre-packed Conv; ``F.unfold`` exports as a chain of gathers that
    measured 17-20x a static MobileNetV2 at a dynamic batch of 16 (benchmarks/results/deploy-ort-eager.md).
    The result is the same: every output is one input times 1.
    """
    if not torch.compiler.is_exporting():
        return F.unfold(x, geom.kernel, dilation=geom.dilation, stride=geom.stride)
    c_in = x.shape[1]
    taps = geom.kernel[0] * geom.kernel[1]
    onehot = torch.eye(taps, dtype=x.dtype, device=x.device).reshape(taps, 1, *geom.kernel).repeat(c_in, 1, 1, 1)
    patches = F.conv2d(x, onehot, None, geom.stride, 0, geom.dilation, c_in)  # [B, C_in * kk, H', W']
    return patches.flatten(2)


def unpadded_output_size(x: Tensor, geom: ConvGeometry) -> tuple[int, int]:
    """Output size of ``x`` that has already been padded."""
    unpadded = ConvGeometry(geom.kernel, geom.stride, geom.dilation, (0, 0, 0, 0), geom.groups)
    return unpadded.output_size(x.shape[2], x.shape[3])


def is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def with_input_layout(out: Tensor, input: Tensor) -> Tensor:
    """The core's layout contract: channels_last in, channels_last out; otherwise contiguous."""
    if is_channels_last(input):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()
