"""DyNet's router bottleneck (``reduction``): off by default (the paper's form), exact, smaller, recipe-settable."""

from __future__ import annotations

import pytest
import torch
from reference import close_enough
from torch import nn

import convert
import dynconv


@pytest.mark.parametrize("reduction", [None, 1, 4])
def test_dynet_with_a_bottleneck_router_converts_exactly_and_learns(reduction) -> None:
    conv = nn.Conv2d(32, 48, 3, padding=1, groups=2)
    layer = dynconv.DyNetConv2d.from_conv(conv, experts=3, reduction=reduction)
    x = torch.randn(4, 32, 10, 10) + torch.linspace(-1, 1, 4).view(4, 1, 1, 1)
    with torch.no_grad():
        assert close_enough(layer(x), conv(x))
    layer(x).square().mean().backward()
    assert layer.router.fc.weight.grad.abs().sum() > 0, "the zeroed output layer must still get gradients"


def test_the_default_keeps_the_single_linear_router_and_reduction_shrinks_it() -> None:
    conv = nn.Conv2d(256, 256, 1)
    plain = dynconv.DyNetConv2d.from_conv(conv, experts=4)
    small = dynconv.DyNetConv2d.from_conv(conv, experts=4, reduction=8)
    count = lambda m: sum(p.numel() for p in m.router.parameters())  # noqa: E731
    assert isinstance(plain.router.hidden, nn.Identity) and count(plain) == 256 * 4 * 256 + 4 * 256
    assert count(small) == 256 * 32 + 32 + 32 * 4 * 256 + 4 * 256 and count(small) < count(plain) / 6
    with pytest.raises(ValueError, match="reduction must be >= 1"):
        dynconv.DyNetConv2d.from_conv(conv, experts=4, reduction=0)


def test_a_recipe_sets_the_dynet_reduction_and_the_checkpoint_rebuilds_it(tmp_path) -> None:
    torch.manual_seed(0)
    model = convert.build_model("resnet18").eval()
    recipe = {"defaults": {"kind": "dynet", "reduction": 16}}
    result = convert.convert_model(model, recipe, experts=2, input_size=32)
    layers = dynconv.dynamic_layers(result.model).values()
    assert all(layer.router_options["reduction"] == 16 for layer in layers)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert close_enough(result.model(x), model(x))
    path = tmp_path / "dynet.safetensors"
    convert.save_checkpoint(result, path)
    loaded = convert.load_checkpoint(path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=0)
    with pytest.raises(convert.RecipeError, match="reduction"):
        convert.Recipe.from_dict({"defaults": {"kind": "dynet", "reduction": 0}})
