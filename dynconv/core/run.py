"""``run``: pick a form for a checked call (unless one is forced), record it and compute it.

The one entry both the eager path (:func:`dynconv.functional.dynamic_conv2d`) and the
opaque compile op (:mod:`dynconv.core.opaque`) call.
"""

from __future__ import annotations

from torch import Tensor

from ..geometry import ConvGeometry
from .forms import FORMS
from .kernels import KernelTerms, is_channels_last
from .rules import choose
from .scope import note_strategy


def select_strategy(
    input: Tensor, weight: Tensor, geom: ConvGeometry, needs_grad: bool, modulated: bool = False
) -> str:
    """The form the core would run for this call (honours :func:`~dynconv.core.scope.strategy_scope`)."""
    batch, c_in, height, width = input.shape
    out_hw = geom.output_size(height, width)
    kernel_bytes = weight[0].numel() * weight.element_size()
    channels_last = is_channels_last(input)
    return choose(batch, c_in, out_hw, geom, needs_grad, kernel_bytes, weight.shape[0], modulated, channels_last)


def run(
    input: Tensor,
    weight: Tensor,
    routing: Tensor,
    bias: Tensor | None,
    geom: ConvGeometry,
    needs_grad: bool,
    strategy: str | None = None,
    terms: KernelTerms | None = None,
) -> Tensor:
    """Compute a checked call with ``strategy`` (``None``: the chosen form); arguments already validated."""
    modulated = terms is not None and bool(terms)
    if strategy is None:
        strategy = select_strategy(input, weight, geom, needs_grad, modulated)
    note_strategy(strategy)
    compute = FORMS[strategy].compute
    assert compute is not None  # choose() and the caller's check only pass core forms
    return (
        compute(input, weight, routing, bias, geom, terms) if modulated else compute(input, weight, routing, bias, geom)
    )
