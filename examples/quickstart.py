"""Quick start: turn one convolution of a torchvision ResNet-18 into each dynamic kind.

Shows the promise of dynconv at layer level: right after conversion the dynamic
layer computes what the original conv did, and its experts are free to diverge.
Run: ``python examples/quickstart.py``
"""

from __future__ import annotations

import torch
import torchvision

import dynconv


def main() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()  # offline: random weights stand in for trained ones
    conv = model.layer3[0].conv1
    x = torch.randn(8, conv.in_channels, 28, 28)
    with torch.no_grad():
        expected = conv(x)
        print(f"original  {conv}  params={conv.weight.numel():,}")
        for kind, cls in dynconv.LAYERS.items():
            layer = cls.from_conv(conv, experts=4, seed=0).eval()
            diff = (layer(x) - expected).abs().max().item()
            params = sum(p.numel() for p in layer.parameters())
            print(f"{kind:9} {type(layer).__name__:12} experts=4 params={params:>9,}  max|diff| = {diff:.1e}")


if __name__ == "__main__":
    main()
