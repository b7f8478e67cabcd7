"""The floor of a deployed dynamic model: the static model plus the work its kind cannot avoid, timed alone.

Per converted layer, on the inputs a batch-1 image gives it (captured once): the router on
the input map, and then only what the kind's math forces on top of the static conv:

- CondConv, DyConv, DyNet, ODConv K>1: mixing the experts once (``routing @ experts``, every
  expert read once);
- DCD: ``Lambda`` scaling the output map, the thin ``Q`` 1x1 on the window centres, the
  ``L x L`` product ``Phi`` and the ``P`` 1x1 added to the output (depthwise: one scale of the centres);
- ODConv: ``a_c`` scaling the input map, ``a_f`` the output map, ``a_s`` the kernel where it has taps.

That work is one module, :class:`ExtraWork`, whose inputs are the captured maps. It is timed on the
path it is read against: exported to ONNX and run in ONNX Runtime beside the static model's ONNX
graph (:func:`ort_floor`), and in eager PyTorch beside the static model (:func:`eager_floor`).
``floor = (static + extra) / static`` on one path is the converted/static ratio a runtime that
fused nothing else could reach there; benchmarks/deploy.py reads every ratio against it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
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
    return [(layer, x.clone(), out.clone()) for layer, x, out in seen]  # plain tensors, exportable


def layer_extra(layer: nn.Module, x: Tensor, out: Tensor, routing_only: bool = False) -> list[Tensor]:
    """The work ``layer``'s kind adds to its static conv for input ``x`` (``out``: a map of the conv's output
    shape, the one the static conv would write): its results.
    ``routing_only``: only the router's part of it (pooling and the router's layers)."""
    if routing_only:
        routing = layer.route(x)
        return [t for t in routing if t is not None] if isinstance(routing, tuple) else [routing]
    weight = layer.weight
    experts = weight.flatten(1)
    if isinstance(layer, dynconv.DCDConv2d):
        latent, groups, geom = layer.router.latent, layer.groups, layer._geometry
        scale, phi = layer.router(x)
        scaled = out * scale[:, :, None, None]
        if latent == 1 and layer.out_channels == groups:  # depthwise: one scale of the centres
            return [scaled + window_centres(x, geom) * phi.reshape(x.shape[0], -1, 1, 1)]
        z = centre_conv(x, layer.q.reshape(groups * latent, -1, 1, 1), geom)
        mixed = (phi @ z.reshape(z.shape[0], groups, latent, -1)).reshape(z.shape)
        return [scaled + F.conv2d(mixed, layer.p.reshape(layer.out_channels, latent, 1, 1), None, 1, 0, 1, groups)]
    if isinstance(layer, dynconv.ODConv2d):
        kernel, filt, channel, spatial = layer.router(x)
        results = [x * channel[:, :, None, None]]
        if filt is not None:
            results.append(out * filt[:, :, None, None])
        taps = weight.shape[3] * weight.shape[4]
        mixed = experts if weight.shape[0] == 1 else kernel @ experts  # mixing the experts once
        if spatial is not None:  # the tap attention on the (mixed) kernel
            mixed = mixed.reshape(mixed.shape[0], -1, taps) * spatial.reshape(-1, 1, taps)
        if weight.shape[0] > 1 or spatial is not None:  # else the kernel stays the constant: no work
            results.append(mixed)
        return results
    routing = layer.route(x)  # [B, K] or, per output channel, [B, K, C_out]: one weight per expert suffices
    routing = routing.reshape(routing.shape[0], weight.shape[0], -1)[:, :, 0]
    return [routing @ experts]


class ExtraWork(nn.Module):
    """Every dynamic layer's unavoidable extra work (or only its routing) as one module:
    ``forward(x_0, out_0, x_1, out_1, ...)`` on each layer's captured input and output (of the static conv's shape)."""

    def __init__(self, layers: list[nn.Module], routing_only: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.routing_only = routing_only

    def forward(self, *maps: Tensor) -> tuple[Tensor, ...]:
        results: list[Tensor] = []
        for i, layer in enumerate(self.layers):
            results += layer_extra(layer, maps[2 * i], maps[2 * i + 1], self.routing_only)
        return tuple(results)


def extra_work(model: nn.Module, size: int) -> tuple[dict[str, ExtraWork], tuple[Tensor, ...]]:
    """``model``'s extra work (``"extra"``) and its routing alone (``"routing"``), and the maps (each
    dynamic layer's input and output for one image) they run on."""
    captured = captured_inputs(model, size)
    maps = tuple(t for _, x, out in captured for t in (x, out))
    layers = [layer for layer, _, _ in captured]
    return {"extra": ExtraWork(layers).eval(), "routing": ExtraWork(layers, routing_only=True).eval()}, maps


def eager_floor(
    static: nn.Module, works: dict[str, ExtraWork], maps: tuple[Tensor, ...], size: int, rounds: int
) -> tuple[float, float, float]:
    """``(static ms, extra ms, routing ms)`` per batch-1 ``size`` image in eager PyTorch, in the same interleaved
    rounds; ``works`` and ``maps`` as :func:`extra_work` gives them."""
    x = torch.randn(1, 3, size, size)
    methods = {"static": lambda: static(x)} | {name: (lambda w=w: w(*maps)) for name, w in works.items()}
    with torch.inference_mode():
        ms = time_rounds(methods, rounds, 0.4)
    return ms["static"], ms["extra"], ms["routing"]


def ort_floor(
    static_onnx: Path, works: dict[str, ExtraWork], maps: tuple[Tensor, ...], size: int, rounds: int, session
) -> tuple[float, float, float]:
    """``(static ms, extra ms, routing ms)`` per batch-1 ``size`` image in ONNX Runtime: the static model's graph
    (``static_onnx``, input ``input``) beside the extra work and the routing (``works`` on ``maps``, as
    :func:`extra_work` gives them), each exported as a graph of its own, in the same interleaved rounds.
    ``session(path)`` opens a path as the benchmark's sessions are opened."""
    names = [f"map{i}" for i in range(len(maps))]
    feed = {name: m.numpy() for name, m in zip(names, maps, strict=True)}
    image = {"input": np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)}
    sessions = {"static": (session(static_onnx), image)}
    for name, work in works.items():
        path = static_onnx.with_name(f"{name}.onnx")
        with contextlib.redirect_stdout(None), torch.no_grad():
            torch.onnx.export(work, maps, dynamo=True, input_names=names).save(path)
        sessions[name] = (session(path), feed)
    ms = time_rounds({name: (lambda s=s, f=f: s.run(None, f)) for name, (s, f) in sessions.items()}, rounds, 0.4)
    return ms["static"], ms["extra"], ms["routing"]
