"""The kinds by name: each layer class registers itself where it is defined (``@register``).

Everything that lists kinds (recipes, the CLI's ``--kind``, ``dynconv kinds``, checkpoint
loading) reads :data:`LAYERS`, so a registered kind is usable everywhere at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from .base import DynamicConv2d

L = TypeVar("L", bound="type[DynamicConv2d]")

#: Layer class by kind name, as recipes and the CLI spell it.
LAYERS: dict[str, type[DynamicConv2d]] = {}


def register(cls: L) -> L:
    """Class decorator: add a layer class to :data:`LAYERS` under its ``kind``; a kind name is taken once."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind name")
    if cls.kind in LAYERS and LAYERS[cls.kind] is not cls:
        raise ValueError(f"kind {cls.kind!r} is already registered to {LAYERS[cls.kind].__name__}")
    LAYERS[cls.kind] = cls
    return cls


def canonical_kind(kind: str) -> str:
    """The registered kind called ``kind``, in any case (``DyConv`` -> ``dyconv``); the one check of a kind name,
    raising ``ValueError`` for a kind that is not registered."""
    names = {name.lower(): name for name in LAYERS}
    if not isinstance(kind, str) or kind.lower() not in names:
        raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(LAYERS)}")
    return names[kind.lower()]


def layer_class(kind: str) -> type[DynamicConv2d]:
    """The layer class for ``kind`` (``condconv``, ``dyconv``, ``dynet``, ``dcd``, ``odconv`` or a registered one)."""
    return LAYERS[canonical_kind(kind)]
