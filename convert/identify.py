"""Recognising a model the user built, so its checkpoint rebuilds by name.

``convert.build_model`` tags what it builds; a model built directly, with
``torchvision.models.resnet18()`` or ``timm.create_model("resnet18", num_classes=10)``,
carries no tag. This module finds the record that rebuilds it: a timm model names its
architecture in ``pretrained_cfg``; a torchvision model's class is matched against the
builders defined next to it. The constructor arguments that change the structure
(``num_classes``, and timm's ``in_chans`` and ``drop_rate``) are read from the model.

A candidate is accepted only when building it gives the same module tree (its ``repr``)
and the same state-dict names and shapes, so a record is never a guess: a model the
user changed in another way stays ``custom``. Candidates are built on the meta device
(no memory, no weight initialisation) where the builder allows, and remembered.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .models import BASE_ATTR, ModelSource, build_model

#: The constructor arguments read from a model, per zoo (others must be the defaults).
ARGUMENTS = {"torchvision": ("num_classes",), "timm": ("num_classes", "in_chans", "drop_rate")}

Fingerprint = tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]


def identify(model: nn.Module) -> ModelSource | None:
    """The torchvision or timm record that rebuilds ``model`` exactly, or ``None`` (a custom model)."""
    module = type(model).__module__
    if module.startswith("timm."):
        cfg = getattr(model, "pretrained_cfg", None) or {}
        name = cfg.get("architecture") if isinstance(cfg, dict) else None
        return _match("timm", name, model) if name else None
    if module.startswith("torchvision.models"):
        for name in _torchvision_builders(module):
            found = _match("torchvision", name, model)
            if found is not None:
                return found
    return None


def fingerprint(model: nn.Module) -> Fingerprint:
    """What must agree for a record to rebuild ``model``: its module tree and state-dict shapes."""
    return repr(model), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _traits(model: nn.Module) -> dict[str, Any]:
    """The structural constructor arguments as they can be read off a built model."""
    first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return {
        "num_classes": getattr(model, "num_classes", None) if hasattr(model, "num_classes") else _outputs(model),
        "in_chans": None if first_conv is None else int(first_conv.in_channels),
        "drop_rate": getattr(model, "drop_rate", None),
    }


def _outputs(model: nn.Module) -> int | None:
    """The class count of a torchvision-style model: its head's output features."""
    from .heads import find_heads

    names = find_heads(model)
    if not names:
        return None
    head = model.get_submodule(names[0])
    return int(getattr(head, "out_features", getattr(head, "out_channels", 0))) or None


def _match(source: str, name: str, model: nn.Module) -> ModelSource | None:
    """``source:name`` with the arguments read off ``model``, if building it gives the same model."""
    default = _candidate(source, name, ())
    if default is None:
        return None
    mine = _traits(model)
    kwargs = {k: mine[k] for k in ARGUMENTS[source] if mine[k] is not None and mine[k] != default[1][k]}
    found = _candidate(source, name, tuple(sorted(kwargs.items()))) if kwargs else default
    if found is not None and found[0] == fingerprint(model):
        return ModelSource(source=source, name=name, kwargs=kwargs)
    return None


@functools.lru_cache(maxsize=64)
def _candidate(source: str, name: str, kwargs: tuple[tuple[str, Any], ...]) -> tuple[Fingerprint, dict] | None:
    """Fingerprint and traits of ``source:name(**kwargs)``, or ``None`` if it does not build."""
    try:
        model = _build_cheaply(lambda: build_model(name, source, **dict(kwargs)))
    except Exception:  # a builder that refuses these arguments is simply not a match
        return None
    return fingerprint(model), _traits(model)


def _build_cheaply(build: Callable[[], nn.Module]) -> nn.Module:
    """Build on the meta device; builders that compute with tensors at init fall back to the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                return build()
        except Exception:
            return build()


@functools.cache
def _torchvision_builders(module: str) -> tuple[str, ...]:
    """torchvision's classification builders defined in ``module`` (e.g. resnet18... for ResNet)."""
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    return tuple(n for n in sorted(names) if torchvision.models.get_model_builder(n).__module__ == module)


def base_of(model: nn.Module) -> ModelSource:
    """The recorded base of ``model``; else the torchvision or timm record that rebuilds it exactly
    (see :func:`identify`); else a ``custom`` record named after its class."""
    base = getattr(model, BASE_ATTR, None)
    if isinstance(base, ModelSource):
        return base
    found = identify(model)
    if found is not None:
        return found
    cls = type(model)
    return ModelSource(source="custom", name=f"{cls.__module__}:{cls.__qualname__}")
