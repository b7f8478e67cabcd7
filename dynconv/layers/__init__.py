"""The dynamic convolution layers, one kind per module, and their registry by kind name."""

from .base import DynamicConv2d
from .condconv import CondConv2d
from .dcd import DCDConv2d
from .dyconv import DyConv2d
from .dynet import DyNetConv2d
from .odconv import ODConv2d
from .spec import Bounds, KindInfo, OptionSpec

#: Layer class by kind name, as recipes and the CLI spell it.
LAYERS: dict[str, type[DynamicConv2d]] = {
    cls.kind: cls for cls in (CondConv2d, DyConv2d, DyNetConv2d, DCDConv2d, ODConv2d)
}


def register(cls: type[DynamicConv2d]) -> type[DynamicConv2d]:
    """Add a layer class to the registry under its ``kind`` (usable as a class decorator).

    Everything that lists kinds (recipes, the CLI's ``--kind``, ``dynconv kinds``,
    checkpoint loading) reads this registry, so a registered kind is usable everywhere.
    """
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind name")
    if cls.kind in LAYERS and LAYERS[cls.kind] is not cls:
        raise ValueError(f"kind {cls.kind!r} is already registered to {LAYERS[cls.kind].__name__}")
    LAYERS[cls.kind] = cls
    return cls


def layer_class(kind: str) -> type[DynamicConv2d]:
    """The layer class for ``kind`` (``condconv``, ``dyconv``, ``dynet``, ``dcd``, ``odconv`` or a registered one)."""
    try:
        return LAYERS[kind]
    except KeyError:
        raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(LAYERS)}") from None


__all__ = [
    "LAYERS",
    "Bounds",
    "CondConv2d",
    "DCDConv2d",
    "DyConv2d",
    "DyNetConv2d",
    "DynamicConv2d",
    "KindInfo",
    "ODConv2d",
    "OptionSpec",
    "layer_class",
    "register",
]
