"""``dynamic_conv2d``: the one core every dynamic layer calls.

Per-sample kernels are mixed from ``K`` experts by a routing tensor and applied to
each sample. This module checks a call and hands it to the core (:mod:`dynconv.core`),
which picks the form that computes it per call (or runs the one forced with ``strategy=``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .core import EXPORTABLE_STRATEGIES, STRATEGIES, KernelTerms, run, select_strategy, strategy_scope
from .core.kernels import with_input_layout
from .core.opaque import call_opaque
from .core.rules import applicable, goes_opaque
from .geometry import ConvGeometry, IntPair, Padding

__all__ = ["EXPORTABLE_STRATEGIES", "STRATEGIES", "dynamic_conv2d", "select_strategy", "strategy_scope"]


def _check_shapes(input: Tensor, weight: Tensor, routing: Tensor, bias: Tensor | None, groups: int) -> None:
    """Raise a ``ValueError`` naming the first dimension that does not fit."""
    if input.dim() != 4:
        raise ValueError(f"input must be 4-D [B, C_in, H, W], got {input.dim()}-D shape {tuple(input.shape)}")
    if weight.dim() != 5:
        raise ValueError(
            f"weight must be 5-D [K, C_out, C_in/groups, kH, kW], got {weight.dim()}-D shape {tuple(weight.shape)}"
        )
    batch, c_in = input.shape[:2]
    experts, c_out, c_in_g = weight.shape[:3]
    if c_in_g * groups != c_in:
        raise ValueError(
            f"input channels (dim 1 of input) is {c_in} but weight expects C_in/groups={c_in_g} x groups={groups}"
            f" = {c_in_g * groups}"
        )
    if c_out % groups:
        raise ValueError(f"output channels (dim 1 of weight) {c_out} is not divisible by groups={groups}")
    if routing.dim() not in (2, 3):
        raise ValueError(f"routing must be [B, K] or [B, K, C_out], got shape {tuple(routing.shape)}")
    if routing.shape[0] != batch:
        raise ValueError(f"routing batch (dim 0) is {routing.shape[0]} but input batch is {batch}")
    if routing.shape[1] != experts:
        raise ValueError(f"routing experts (dim 1) is {routing.shape[1]} but weight has K={experts} experts")
    if routing.dim() == 3 and routing.shape[2] != c_out:
        raise ValueError(f"routing channels (dim 2) is {routing.shape[2]} but weight has C_out={c_out}")
    if bias is not None and tuple(bias.shape) != (experts, c_out):
        raise ValueError(f"bias must be [K, C_out] = [{experts}, {c_out}], got shape {tuple(bias.shape)}")


def _check_dtypes(input: Tensor, weight: Tensor) -> None:
    if input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type):
        raise ValueError(
            f"input dtype {input.dtype} differs from weight dtype {weight.dtype}; cast one or use torch.autocast"
        )


def _check_modulation(modulation: tuple[Tensor, ...], input: Tensor, weight: Tensor) -> None:
    """Each factor is 5-D, per sample, and broadcasts to one sample's kernel."""
    kernel = (weight.shape[1], weight.shape[2], weight.shape[3], weight.shape[4])
    for i, factor in enumerate(modulation):
        if factor.dim() != 5 or factor.shape[0] != input.shape[0]:
            raise ValueError(
                f"modulation factor {i} must be [B, C_out|1, C_in/groups|1, kH|1, kW|1] with B={input.shape[0]}, "
                f"got shape {tuple(factor.shape)}"
            )
        if any(f not in (1, k) for f, k in zip(factor.shape[1:], kernel, strict=True)):
            raise ValueError(
                f"modulation factor {i} of shape {tuple(factor.shape)} does not broadcast to the kernel {kernel}"
            )


def dynamic_conv2d(
    input: Tensor,
    weight: Tensor,
    routing: Tensor,
    bias: Tensor | None = None,
    stride: IntPair = 1,
    padding: Padding = 0,
    dilation: IntPair = 1,
    groups: int = 1,
    *,
    strategy: str | None = None,
    modulation: tuple[Tensor, ...] | list[Tensor] | None = None,
    offset: Tensor | None = None,
) -> Tensor:
    """Convolve each sample with its own kernel ``sum_k routing[b, k] * weight[k]``.

    Equal (to float tolerance, values and gradients) to the per-sample loop
    ``y[b] = F.conv2d(x[b:b+1], sum_k r[b,k] W[k], sum_k r[b,k] bias[k], ...)``;
    per-output-channel routing ``[B, K, C_out]`` mixes each output channel on its own.
    ``modulation`` (optional) is a sequence of per-sample factors, each broadcastable
    to ``[B, C_out, C_in/groups, kH, kW]``, multiplied into every sample's mixed kernel
    (not into the bias): routing that varies over input channels or kernel taps, as
    ODConv's. ``offset`` (optional, ``[B, C_out, C_in/groups, kH, kW]``) is added to each
    sample's kernel after that: DCD's low-rank term on 1x1 convs. ``strategy`` forces one
    of :data:`STRATEGIES` (``None`` picks by shape); a channels_last input gives a
    channels_last output.
    """
    _check_shapes(input, weight, routing, bias, groups)
    _check_dtypes(input, weight)
    modulation = tuple(modulation or ())
    _check_modulation(modulation, input, weight)
    if offset is not None and tuple(offset.shape) != (input.shape[0], *weight.shape[1:]):
        raise ValueError(
            f"offset must be [B, C_out, C_in/groups, kH, kW] = {[input.shape[0], *weight.shape[1:]]}, "
            f"got shape {tuple(offset.shape)}"
        )
    geom = ConvGeometry.build(tuple(weight.shape[3:]), stride, padding, dilation, groups)
    geom.output_size(input.shape[2], input.shape[3])  # raises on inputs smaller than the kernel
    terms = KernelTerms(modulation, offset)
    tensors = [t for t in (input, weight, routing, bias, offset, *modulation) if t is not None]
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    modulated = bool(terms)
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {sorted(STRATEGIES)}")
    if strategy is not None and not applicable(strategy, input.shape[0], geom, modulated):
        what = "a modulated " if modulated else "a "
        raise ValueError(f"strategy {strategy!r} cannot compute {what}{geom.kernel} conv at batch {input.shape[0]}")
    autocast = torch.is_autocast_enabled(input.device.type)
    if not autocast:
        routing = routing.to(weight.dtype)
        terms = KernelTerms(
            tuple(m.to(weight.dtype) for m in modulation), None if offset is None else offset.to(weight.dtype)
        )
    # the opaque op takes calls with matching dtypes; under autocast the call stays traced
    if not autocast and goes_opaque(input.shape[0], needs_grad, strategy):
        return call_opaque(input, weight, routing, bias, geom, terms)
    return with_input_layout(run(input, weight, routing, bias, geom, needs_grad, strategy, terms), input)
