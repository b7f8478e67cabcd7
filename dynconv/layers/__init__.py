"""The dynamic convolution layers, one kind per module, and their registry by kind name."""

from .base import DynamicConv2d
from .condconv import CondConv2d
from .dyconv import DyConv2d
from .dynet import DyNetConv2d

#: Layer class by kind name, as recipes and the CLI spell it.
LAYERS: dict[str, type[DynamicConv2d]] = {cls.kind: cls for cls in (CondConv2d, DyConv2d, DyNetConv2d)}


def layer_class(kind: str) -> type[DynamicConv2d]:
    """The layer class for ``kind`` (``condconv``, ``dyconv`` or ``dynet``)."""
    try:
        return LAYERS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(LAYERS)}") from None


__all__ = ["LAYERS", "CondConv2d", "DyConv2d", "DyNetConv2d", "DynamicConv2d", "layer_class"]
