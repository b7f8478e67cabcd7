"""The floor of a deployed dynamic model: the static model plus the work its kind cannot avoid, timed alone.

Per converted layer, on the inputs a batch-1 image gives it (captured once): the router on
the input map, and then only what the kind's math forces on top of the static conv:

- CondConv, DyConv, DyNet, ODConv K>1: mixing the experts once (``routing @ experts``, every
  expert read once);
- DCD: ``Lambda`` scaling the output map, the thin ``Q`` 1x1 on the window centres, the
  ``L x L`` product ``Phi`` and the ``P`` 1x1 added to the output (depthwise: one scale of the centres);
- ODConv: ``a_c`` scaling the input map, ``a_f`` the output map, ``a_s`` the kernel where it has taps.

``floor = (static + extra) / static`` is the converted/static ratio a runtime that fused
nothing else could reach; benchmarks/deploy.py reads every ratio against it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from core import time_rounds
from torch import Tensor, nn
from torch.nn import functional as F

import dynconv
from dynconv.layers.dcd import centre_conv, window_centres


def captured_inputs(model: nn.Module, size: int) -> list[tuple[nn.Module, Tensor, Tensor]]:
    """``(layer, input, output)`` of every dynamic layer of ``model`` for one random ``size`` image."""
    seen: list[tuple[nn.Module, Tensor, Tensor]] = []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: seen.append((mod, args[0].detach(), out.detach())))
        for m in model.modules()
        if isinstance(m, dynconv.DynamicConv2d)
    ]
    try:
        with torch.inference_mode():
            model(torch.randn(1, 3, size, size))
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def extra_work(layer: nn.Module, x: Tensor, out: Tensor) -> Callable[[], None]:
    """A closure doing the work ``layer``'s kind adds to its static conv for input ``x`` (output ``out``)."""
    weight = layer.weight.detach()
    experts = weight.flatten(1)
    uniform = torch.full((1, weight.shape[0]), 1.0 / weight.shape[0])
    geom = layer._geometry

    if isinstance(layer, dynconv.DCDConv2d):
        latent, groups = layer.router.latent, layer.groups
        q = layer.q.detach().reshape(groups * latent, -1, 1, 1)
        p = layer.p.detach().reshape(layer.out_channels, latent, 1, 1)
        depthwise = latent == 1 and layer.out_channels == groups

        def dcd() -> None:
            scale, phi = layer.router(x)
            scaled = out * scale[:, :, None, None]
            if depthwise:
                scaled + window_centres(x, geom) * phi.reshape(1, -1, 1, 1)
                return
            z = centre_conv(x, q, geom)
            mixed = phi @ z.reshape(1, groups, latent, -1)
            scaled + F.conv2d(mixed.reshape(z.shape), p, None, 1, 0, 1, groups)

        return dcd

    if isinstance(layer, dynconv.ODConv2d):

        def odconv() -> None:
            kernel, filt, channel, spatial = layer.router(x)
            x * channel[:, :, None, None]
            if filt is not None:
                out * filt[:, :, None, None]
            kernels = experts if weight.shape[0] == 1 else torch.mm(kernel, experts)
            if spatial is not None:
                kernels.reshape(-1, *weight.shape[3:]) * spatial.reshape(1, *weight.shape[3:])

        return odconv

    def mixing() -> None:
        layer.route(x)
        torch.mm(uniform, experts)

    return mixing


def extra_ms(model: nn.Module, size: int, rounds: int) -> float:
    """ms per batch-1 image of every dynamic layer's unavoidable extra work, in eager PyTorch."""
    work = [extra_work(layer, x, out) for layer, x, out in captured_inputs(model, size)]

    def run() -> None:
        for fn in work:
            fn()

    with torch.inference_mode():
        return time_rounds({"extra": run}, rounds, 0.4)["extra"]
