"""Replacing modules by qualified name, and building a dynamic layer from a recorded spec.

Both the converter and checkpoint loading go through :func:`build_layer` with a
:class:`~convert.plan.ConvPlan`, so a checkpoint is rebuilt with exactly the structure
the conversion produced.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from dynconv import DynamicConv2d, layer_class

if TYPE_CHECKING:
    from .plan import ConvPlan


def build_layer(conv: nn.Conv2d, plan: ConvPlan) -> DynamicConv2d:
    """The dynamic layer ``plan`` describes, from ``conv``'s weights (see :class:`convert.plan.ConvPlan`)."""
    return layer_class(plan.kind).from_conv(
        conv, experts=plan.experts, noise=plan.noise, seed=plan.seed, **plan.conv_options, **plan.router
    )


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
