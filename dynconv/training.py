"""Training helpers for converted models: parameter groups and freezing by role.

A common fine-tuning recipe warms up the routers alone (experts and the rest of the
network frozen), then trains everything, often with a larger learning rate for the
routers, which start from zero.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn

from .inspection import dynamic_layers


def router_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Parameters of every dynamic layer's router."""
    seen: set[int] = set()  # a router shared by a block's layers counts once
    for layer in dynamic_layers(model).values():
        for p in layer.router_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def expert_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Every dynamic layer's kernels: experts (``weight``), their ``bias``, a standardisation ``gain``."""
    for layer in dynamic_layers(model).values():
        yield from layer.expert_parameters()


def other_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """Everything that is not a router or an expert (norms, heads, static convs)."""
    dynamic = {id(p) for p in router_parameters(model)} | {id(p) for p in expert_parameters(model)}
    for p in model.parameters():
        if id(p) not in dynamic:
            yield p


def set_trainable(
    model: nn.Module, *, routers: bool | None = None, experts: bool | None = None, rest: bool | None = None
) -> dict[str, int]:
    """Set ``requires_grad`` by role (``None`` leaves a role as it is); return parameter counts set.

    ``set_trainable(model, routers=True, experts=False, rest=False)`` is a router warm-up;
    ``set_trainable(model, routers=True, experts=True, rest=True)`` unfreezes everything.
    """
    counts = {}
    for role, flag, params in (
        ("routers", routers, router_parameters(model)),
        ("experts", experts, expert_parameters(model)),
        ("rest", rest, other_parameters(model)),
    ):
        params = list(params)
        if flag is not None:
            for p in params:
                p.requires_grad_(flag)
        counts[role] = sum(p.numel() for p in params)
    return counts


def parameter_groups(model: nn.Module, router_lr_scale: float = 1.0, **common: float) -> list[dict]:
    """Optimizer groups: routers (learning rate scaled by ``router_lr_scale``) and the rest."""
    routers = [p for p in router_parameters(model) if p.requires_grad]
    ids = {id(p) for p in routers}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": others, **common}]
    if routers:
        group = {"params": routers, **common}
        if "lr" in common:
            group["lr"] = common["lr"] * router_lr_scale
        groups.append(group)
    return groups
