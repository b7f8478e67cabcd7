"""ODConv's three ways to compute (kernel factors, attentions on the maps, rescaled im2col) agree with the formula."""

from __future__ import annotations

import pytest
import torch
from reference import close_enough
from test_new_kinds import odconv_reference, randomize_router
from torch import nn

from dynconv import ODConv2d
from dynconv.core import record_strategies
from dynconv.core.rules import odconv_path

# (c_in, c_out, kernel, groups, map, experts, batch, path the layer takes)
CASES = [
    (64, 48, 1, 1, 2, 1, 3, "maps"),  # 1x1 ODConv 1x, maps smaller than the kernel: one static conv
    (64, 48, 1, 1, 2, 1, 1, "maps"),
    (64, 48, 1, 1, 16, 1, 3, "kernel"),  # maps bigger than the kernel: scale the kernel
    (64, 48, 1, 1, 2, 4, 3, "maps"),  # tiny map, wide kernel: scale the maps, mix the experts in the core
    (64, 48, 1, 1, 16, 4, 3, "kernel"),
    (64, 64, 3, 1, 4, 4, 2, "maps"),  # maps path with the tap attention left in the kernel
    (64, 64, 3, 1, 12, 1, 2, "maps"),  # ODConv 1x on a 12x12 map: maps path, taps in the kernel
    (64, 64, 3, 1, 4, 1, 2, "rescaled"),  # ODConv 1x on a small map
    (8, 8, 3, 1, 32, 4, 2, "kernel"),
    (32, 64, 3, 2, 4, 4, 2, "maps"),  # grouped: the input attention per input channel still holds
    (32, 32, 3, 32, 4, 1, 2, "kernel"),  # depthwise kernels are always the smaller
]


def case_id(case) -> str:
    c_in, c_out, k, g, size, n, b, path = case
    return f"{c_in}-{c_out}-k{k}-g{g}-{size}px-n{n}-b{b}-{path}"


def layer_for(c_in: int, c_out: int, k: int, groups: int, experts: int) -> ODConv2d:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=True)
    with torch.no_grad():
        conv.bias.normal_()
    layer = ODConv2d.from_conv(conv, experts=experts, seed=1)
    randomize_router(layer)
    return layer, conv


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_path_follows_the_formula(case) -> None:
    c_in, c_out, k, groups, size, experts, batch, path = case
    layer, conv = layer_for(c_in, c_out, k, groups, experts)
    x = torch.randn(batch, c_in, size, size) + torch.linspace(-1, 1, batch).view(batch, 1, 1, 1)
    with torch.no_grad(), record_strategies() as seen:
        actual = layer(x)
        expected = odconv_reference(layer, conv, x)
    expected_path = {"kernel": "core"}.get(path, path)
    assert odconv_path(x.shape, layer.weight.shape, layer._geometry, k > 1, None) == expected_path
    assert ("rescaled" in seen) == (path == "rescaled")
    assert ("static" in seen) == (path == "maps" and experts == 1 and k == 1)
    assert close_enough(actual, expected)


@pytest.mark.parametrize("case", [c for c in CASES if c[-1] == "maps"], ids=case_id)
def test_maps_path_trains_and_keeps_channels_last(case) -> None:
    c_in, c_out, k, groups, size, experts, batch, _ = case
    layer, conv = layer_for(c_in, c_out, k, groups, experts)
    layer.train()
    x = torch.randn(batch, c_in, size, size).contiguous(memory_format=torch.channels_last)
    out = layer(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert close_enough(out, odconv_reference(layer, conv, x.contiguous()))
    out.square().mean().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
