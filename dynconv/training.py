"""Training helpers for converted models: parameter groups and freezing by role.

A common fine-tuning recipe warms up the routers alone (experts and the rest of the
network frozen), then trains everything, often with a larger learning rate for the
routers, which start from zero.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch import nn

from .inspection import dynamic_layers
from .step_matching import optimizer_family


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


def _layer_multipliers(model: nn.Module, family: str) -> dict[int, tuple[str, float]]:
    """Role and learning-rate multiplier of every parameter of the model's dynamic layers, by ``id``."""
    found: dict[int, tuple[str, float]] = {}
    for layer in dynamic_layers(model).values():
        multipliers = layer.lr_multipliers(family)
        for p in layer.router_parameters():
            found.setdefault(id(p), ("routers", multipliers["router"]))
        experts = {id(p) for p in layer.expert_parameters()}
        for name, p in layer.named_parameters():
            if id(p) not in found and id(p) in experts:
                found[id(p)] = ("experts", multipliers.get(name.split(".")[0], 1.0))
    return found


def parameter_groups(
    model: nn.Module,
    router_lr_scale: float | None = None,
    *,
    lr: float,
    optimizer: str = "sgd",
    **common: Any,
) -> list[dict]:
    """Optimizer groups: one step on a freshly converted model moves each kernel as a step on the original would.

    Each group's ``lr`` is ``lr`` x the multiplier its layer declares for ``optimizer``'s family
    (:meth:`DynamicConv2d.lr_multipliers`; a given ``router_lr_scale`` replaces the routers'), and a given
    ``weight_decay`` is divided by it, so decay shrinks the kernel as the original's does. Biases and
    1-D parameters get ``weight_decay`` 0 (timm's rule). Each group has a ``name`` (role, multiplier,
    decay) and ``lr_multiplier``; the list goes straight into ``torch.optim`` or
    ``timm.optim.create_optimizer_v2`` (whose schedulers keep the per-group ratios).
    """
    family = optimizer_family(optimizer)
    weight_decay = common.pop("weight_decay", None)
    roles = _layer_multipliers(model, family)
    groups: dict[tuple[str, float, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        role, multiplier = roles.get(id(p), ("rest", 1.0))
        if role == "routers" and router_lr_scale is not None:
            multiplier = router_lr_scale
        decays = not (p.ndim <= 1 or name.endswith("bias"))
        key = (role, multiplier, decays)
        if key not in groups:
            group = {"params": [], **common, "lr": lr * multiplier, "lr_multiplier": multiplier}
            group["name"] = f"{role} x{multiplier:g} " + ("decay" if decays else "no_decay")
            if not decays:
                group["weight_decay"] = 0.0
            elif weight_decay is not None:
                group["weight_decay"] = weight_decay / multiplier
            groups[key] = group
        groups[key]["params"].append(p)
    return list(groups.values())
