"""The core as one opaque op for ``torch.compile`` at inference.

Traced by dynamo, the core must pick a form that serves every batch size (no
per-sample kernel, see :func:`dynconv.choice.serves_any_batch`), and those forms
cost 2-8x the eager ones at batch 16. Behind a ``torch.library`` custom op with a
fake kernel, the compiled graph keeps a dynamic batch and never recompiles, while
the op itself runs eagerly and picks the fastest strategy for the batch it gets.
Used only when no gradient is needed and PyTorch is compiling, not exporting:
an exported graph must stay in standard ops, and training keeps the traced core.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .choice import serves_any_batch
from .geometry import ConvGeometry
from .strategies import is_channels_last

__all__ = ["call_opaque", "dynamic_conv2d_op", "use_opaque_op"]


def use_opaque_op(batch: int | torch.SymInt, needs_grad: bool, strategy: str | None) -> bool:
    """Whether this call should go through the opaque op: compiling a graph that serves any batch, for
    inference, with no forced strategy. Batch 1 gets its own graph anyway and stays traced (fused)."""
    if strategy is not None or needs_grad or not torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return serves_any_batch(batch)


def _output_layout(out: Tensor, input: Tensor) -> Tensor:
    """The core's layout contract: channels_last in, channels_last out; otherwise contiguous."""
    if is_channels_last(input):
        return out.contiguous(memory_format=torch.channels_last)
    return out.contiguous()


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
) -> Tensor:
    """``dynamic_conv2d`` with explicit ``(left, right, top, bottom)`` padding, run eagerly (strategy by shape)."""
    from .functional import run_core  # the op is registered at import time; functional imports this module

    geom = ConvGeometry(tuple(weight.shape[3:]), tuple(stride), tuple(dilation), tuple(pad), groups)
    return _output_layout(run_core(input, weight, routing, bias, geom, needs_grad=False), input)


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
) -> Tensor:
    geom = ConvGeometry(tuple(weight.shape[3:]), tuple(stride), tuple(dilation), tuple(pad), groups)
    height, width = geom.output_size(input.shape[2], input.shape[3])
    return _output_layout(input.new_empty((input.shape[0], weight.shape[1], height, width)), input)


def call_opaque(input: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, geom: ConvGeometry) -> Tensor:
    """Run the core through the opaque op (see the module docstring)."""
    return dynamic_conv2d_op(
        input, weight, routing, bias, list(geom.stride), list(geom.dilation), list(geom.pad), geom.groups
    )
