"""Converted models as a deployment test would see them: trained-looking BatchNorms, routing off zero."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

import convert
import dynconv
from convert.verify import signal_preserving_init

KINDS = list(dynconv.LAYERS)


def trained_batchnorms_(model: nn.Module, bias_half_width: float) -> nn.Module:
    """Give every BatchNorm2d of ``model`` trained-looking statistics and affine (seeded):
    mean in [-0.5, 0.5), variance and scale in [0.5, 1.5), shift within ``bias_half_width`` of 0."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) * (2 * bias_half_width) - bias_half_width)
    return model


def trained_like(name: str) -> nn.Module:
    """A seeded torchvision model whose BatchNorms look trained (non-trivial statistics and affine)."""
    model = signal_preserving_init(torchvision.models.get_model(name))
    return trained_batchnorms_(model, bias_half_width=0.3).eval()


def converted(name: str, kind: str) -> nn.Module:
    """``name`` converted to ``kind`` with routers moved off zero, so routing depends on the input."""
    model = convert.convert_model(
        trained_like(name), kind=kind, **({} if kind == "dcd" else {"experts": 4}), input_size=64
    ).model
    gen = torch.Generator().manual_seed(2)
    # DCD and ODConv routers scale or add to the whole kernel: logits of order one compound over
    # twenty layers (no BatchNorm renormalises in eval mode) into overflow, a tenth does not
    size = 0.1 if kind in ("dcd", "odconv") else 1.0
    with torch.no_grad():
        for layer in dynconv.dynamic_layers(model).values():
            for fc in layer.router.modules():
                if isinstance(fc, nn.Linear):  # logits of order one, away from sigmoid/softmax saturation
                    fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) * size / fc.in_features**0.5)
    return model.eval()


def batch(n: int = 3, size: int = 64) -> torch.Tensor:
    """Samples with different means, so even the first router sees different pooled features."""
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(n))
    return x + torch.linspace(-1, 1, n).view(n, 1, 1, 1)


def routing_varies(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether most layers route the first two samples differently (else the checks prove little)."""
    with dynconv.capture_routing(model) as routes, torch.no_grad():
        model(x)
    spread = torch.tensor([float((r[0] - r[1]).abs().max()) for r in routes.values()])
    return len(routes) > 0 and spread.median().item() > 1e-3


def compare_arrays(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return actual.shape == expected.shape and bool(
        (actual - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-5
    )


def converted_models() -> dict[tuple[str, str], nn.Module]:
    """resnet18 and mobilenet_v2, converted with every kind."""
    return {(n, k): converted(n, k) for n in ("resnet18", "mobilenet_v2") for k in KINDS}
