"""Looking at routing decisions after a forward, without holding tensors during training."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn

from .layers.base import DynamicConv2d


def dynamic_layers(model: nn.Module) -> dict[str, DynamicConv2d]:
    """Every dynamic convolution in ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicConv2d)}


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Record each dynamic layer's routing weights (detached) for forwards run in the block.

    Yields a dict that is filled by layer name when the block ends; the layers keep nothing after it.
    """
    layers = dynamic_layers(model)
    captured: dict[str, Tensor] = {}
    for layer in layers.values():
        layer.capture_routing = True
        layer.last_routing = None
    try:
        yield captured
    finally:
        for name, layer in layers.items():
            if layer.last_routing is not None:
                captured[name] = layer.last_routing
            layer.capture_routing = False
            layer.last_routing = None
