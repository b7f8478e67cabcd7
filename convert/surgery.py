"""Replacing modules by qualified name, and building a dynamic layer from a recorded spec.

Both the converter and checkpoint loading go through :func:`build_layer`, so a
checkpoint is rebuilt with exactly the structure the conversion produced.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dynconv import DynamicConv2d, layer_class

from .conv_classes import conversion_options


def build_layer(
    conv: nn.Conv2d, kind: str, options: dict[str, Any], *, noise: float = 0.0, seed: int = 0
) -> DynamicConv2d:
    """A ``kind`` layer from ``conv`` with recorded ``options`` (``experts`` and router options).

    ``padding``/``standardize`` come from the conv's class (see :mod:`convert.conv_classes`);
    options that do not apply to ``kind`` are ignored, so one recipe can mix kinds.
    """
    cls = layer_class(kind)
    router = {k: v for k, v in options.items() if k in cls.router_option_names()}
    extra = conversion_options(conv)
    return cls.from_conv(conv, experts=int(options["experts"]), noise=noise, seed=seed, **extra, **router)


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at qualified ``name`` (``""`` is the model itself)."""
    return model.get_submodule(name) if name else model


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at qualified ``name``, in ``ModuleList``/``Sequential``/``ModuleDict`` too."""
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = module
    else:
        setattr(parent, child, module)


def replace_all(model: nn.Module, names: list[str], module: nn.Module) -> None:
    """Put ``module`` at every name in ``names`` (a shared conv stays shared)."""
    for name in names:
        set_module(model, name, module)
