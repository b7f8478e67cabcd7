"""Conversion settings: each default with its help text, written once.

The CLI's ``convert`` options, the recipe schema and :func:`convert.convert_model` all
read their defaults and help from :class:`ConversionDefaults` (the fine-tuning settings
do the same in :mod:`convert.finetune.config`). The expert count and the noise are the
runtime's own defaults (:mod:`dynconv.experts`), so a layer built by hand and a converted
one agree; each kind's router options are its ``_build_router`` defaults
(:func:`router_option_help` describes them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from dynconv import DynamicConv2d
from dynconv.experts import DEFAULT_EXPERTS, DEFAULT_NOISE


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ConversionDefaults:
    """What a conv gets when neither the arguments nor the recipe say otherwise."""

    kind: str = _opt("condconv", "a kind listed by dynconv kinds")
    experts: int = _opt(DEFAULT_EXPERTS, "experts per layer")
    noise: float = _opt(DEFAULT_NOISE, "relative noise between experts")
    seed: int = _opt(0, "seed for the experts' noise")
    share_routing: str = _opt("none", "none | block: one router per block, fed by the block's input")


#: The settings every conv has whatever its kind: the weakest level of the recipe precedence.
PER_LAYER = ("kind", "experts", "noise", "share_routing")


def default(name: str) -> Any:
    """The default of conversion setting ``name``."""
    return ConversionDefaults.__dataclass_fields__[name].default


def help_text(name: str) -> str:
    """The help text of conversion setting ``name``, ending with its default."""
    return f"{ConversionDefaults.__dataclass_fields__[name].metadata['help']} (default {default(name)})"


def builtin_options() -> dict[str, Any]:
    """The per-layer defaults (``kind``, ``experts``, ``noise``, ``share_routing``), as a recipe level."""
    return {f.name: f.default for f in fields(ConversionDefaults) if f.name in PER_LAYER}


def router_option_help(name: str, layers: Iterable[type[DynamicConv2d]]) -> str:
    """``name``'s default for each of ``layers`` that takes it, e.g. ``"default: dyconv 30.0, odconv 1.0"``."""
    defaults = [f"{c.kind} {c.option_specs()[name].default!r}" for c in layers if name in c.option_specs()]
    return f"router option; default: {', '.join(defaults)}"
