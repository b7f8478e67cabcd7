"""The core as one opaque op for ``torch.compile`` at inference.

Traced by dynamo, the core must pick a form that serves every batch size (no
per-sample kernel, see :func:`dynconv.core.rules.serves_any_batch`), and those forms
cost 2-8x the eager ones at batch 16. Behind a ``torch.library`` custom op with a
fake kernel, the compiled graph keeps a dynamic batch and never recompiles, while
the op itself runs eagerly and picks the fastest strategy for the batch it gets. Kernel
terms (ODConv's attentions, DCD's ``Lambda`` and low-rank offset) go through it too.
When a call goes through it is :func:`dynconv.core.rules.goes_opaque`'s rule.

For 1x1 and depthwise kernels the op takes and returns channels_last maps. Inductor keeps a
custom op's inputs in the layout they were traced with, and as soon as a graph holds one
static conv (EfficientNet's squeeze-excitation, a stem left static) it lays out the maps
around it in channels_last: traced contiguous, every dynamic layer then cost a transposing
copy of its input (EfficientNet-B0 CondConv at batch 16, compiled: 2.47x compiled static,
1 thread). In channels_last the copies go (1.51x): 1x1 kernels run as a matmul over pixels,
depthwise ones one conv per sample (:func:`dynconv.core.rules.opaque_on_channels_last`).
Dense k x k kernels stay contiguous: their batch fold would copy channels_last maps, and
per-sample convs of them measured slower at 2 threads (ResNet-18 CondConv: 2.23x against 2.04x).
So do calls with kernel terms (ODConv): its 1x1 layers take the maps path, traced outside the
op, so channels_last depthwise calls between them measured slower (MobileNetV2 ODConv 1x at
batch 16, 2 threads: 2.40x against 1.85x).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..geometry import ConvGeometry
from .kernels import KernelTerms, with_input_layout
from .rules import opaque_on_channels_last
from .run import run

__all__ = ["call_opaque", "dynamic_conv2d_op"]


@torch.library.custom_op("dynconv::dynamic_conv2d", mutates_args=())
def dynamic_conv2d_op(
    input: Tensor,
    weight: Tensor,
    routing: Tensor,
    bias: Tensor | None,
    stride: list[int],
    dilation: list[int],
    pad: list[int],
    groups: int,
    factors: list[Tensor],
    offset: Tensor | None,
) -> Tensor:
    """``dynamic_conv2d`` with explicit ``(left, right, top, bottom)`` padding and the kernel terms
    (``factors``, ``offset``) as plain arguments, run eagerly (strategy by shape)."""
    geom = ConvGeometry(tuple(weight.shape[3:]), tuple(stride), tuple(dilation), tuple(pad), groups)
    terms = KernelTerms(tuple(factors), offset)
    out = run(input, weight, routing, bias, geom, needs_grad=False, terms=terms if terms else None)
    return with_input_layout(out, input)


@dynamic_conv2d_op.register_fake
def _fake(
    input: Tensor,
    weight: Tensor,
    routing: Tensor,
    bias: Tensor | None,
    stride: list[int],
    dilation: list[int],
    pad: list[int],
    groups: int,
    factors: list[Tensor],
    offset: Tensor | None,
) -> Tensor:
    geom = ConvGeometry(tuple(weight.shape[3:]), tuple(stride), tuple(dilation), tuple(pad), groups)
    height, width = geom.output_size(input.shape[2], input.shape[3])
    return with_input_layout(input.new_empty((input.shape[0], weight.shape[1], height, width)), input)


def call_opaque(
    input: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, geom: ConvGeometry, terms: KernelTerms
) -> Tensor:
    """Run the core through the opaque op (see the module docstring), on channels_last maps where
    :func:`~dynconv.core.rules.opaque_on_channels_last` says so."""
    if opaque_on_channels_last(geom, weight.shape[2], bool(terms)):
        input = input.contiguous(memory_format=torch.channels_last)
    return dynamic_conv2d_op(
        input,
        weight,
        routing,
        bias,
        list(geom.stride),
        list(geom.dilation),
        list(geom.pad),
        geom.groups,
        list(terms.factors),
        terms.offset,
    )
