"""ODConv on weight-standardised convs (issue 23, point 4): each expert standardised, then modulated, exact."""

from __future__ import annotations

import pytest
import torch
from timm.layers import ScaledStdConv2d, StdConv2d
from torch import nn

import convert
import dynconv
from convert.conv_classes import conversion_options
from convert.verify import compare, difference
from dynconv.experts import DEFAULT_NOISE


def gained(conv: nn.Conv2d) -> nn.Conv2d:
    """NFNet's learnt gain, away from its initial 1 so that copying it matters."""
    if getattr(conv, "gain", None) is not None:
        with torch.no_grad():
            conv.gain.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
    return conv


CONVS = {
    "StdConv2d 3x3": lambda: StdConv2d(16, 32, 3, padding=1),
    "StdConv2d depthwise": lambda: StdConv2d(16, 16, 3, groups=16),
    "ScaledStdConv2d 3x3": lambda: gained(ScaledStdConv2d(16, 32, 3, gamma=1.7)),
    "ScaledStdConv2d 1x1": lambda: gained(ScaledStdConv2d(16, 32, 1)),
}


@pytest.mark.parametrize("experts", [1, 4])
@pytest.mark.parametrize("name", list(CONVS))
def test_odconv_keeps_a_standardised_conv_exactly_with_separate_experts(name: str, experts: int) -> None:
    conv = CONVS[name]().eval()
    layer = dynconv.ODConv2d.from_conv(conv, experts=experts, **conversion_options(conv)).eval()
    x = torch.randn(3, 16, 12, 12)
    with torch.no_grad():
        _, _, ok = difference(conv(x), layer(x))
    assert ok
    if experts > 1:  # the experts differ, so training can tell them apart
        spread = float((layer.weight - layer.weight.mean(0)).detach().norm() / layer.weight.mean(0).detach().norm())
        assert 0.5 * DEFAULT_NOISE < spread < 5 * DEFAULT_NOISE  # of the order of the conversion's noise


def test_odconv_converts_an_nf_resnet_exactly_and_the_checkpoint_round_trips(tmp_path) -> None:
    torch.manual_seed(0)
    model = convert.build_model("nf_resnet26").eval()
    result = convert.convert_model(
        model, kind="odconv", experts=2, input_size=64, include=["stages.0.*", "stages.1.0.*"]
    )
    assert result.layers and all(type(r).__name__ != "SkipRecord" for r in result.layers)
    x = torch.randn(2, 3, 64, 64)
    assert compare(model, result.model, x).ok
    loaded = convert.load_checkpoint(convert.save_checkpoint(result, tmp_path / "nf.safetensors"))
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
