"""The dynamic convolution layers, one kind per module, and their registry by kind name.

Every module of this package is imported here, and each kind registers itself where it
is defined (``@register``): a new kind is one new file in this folder, with no other edit.
"""

import importlib
import pkgutil

from .base import DynamicConv2d

# isort: off
# the built-in kinds, registered in the order `dynconv kinds` lists them
from .condconv import CondConv2d
from .dyconv import DyConv2d
from .dynet import DyNetConv2d
from .dcd import DCDConv2d
from .odconv import ODConv2d

# isort: on
from .registry import LAYERS, canonical_kind, layer_class, register
from .spec import Bounds, KindInfo, OptionSpec

for _module in pkgutil.iter_modules(__path__):  # any other kind module: registered by importing it
    importlib.import_module(f"{__name__}.{_module.name}")

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
    "canonical_kind",
    "layer_class",
    "register",
]
