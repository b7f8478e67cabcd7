"""The decision step of a conversion: for each conv, a frozen plan of what it becomes, or why it stays static.

A :class:`ConvPlan` is built once per conv by :func:`decide` and handed as-is to
:func:`convert.surgery.build_layer`; checkpoint loading builds one from a recorded
layer (:meth:`ConvPlan.from_record`), so both build through the same path.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from dynconv import layer_class

from .conv_classes import UnsupportedConvError, conversion_options
from .probe import ConvSite, is_already_dynamic
from .recipe import Recipe, name_matches
from .selection import default_skip_reason, named_exactly


@dataclass(frozen=True)
class ConvPlan:
    """What one conv becomes: kind, experts, noise, seed, router options and its class's options."""

    kind: str
    experts: int
    noise: float
    seed: int
    #: The router options set by the recipe or the arguments; the kind's own defaults fill the rest.
    router: Mapping[str, Any]
    #: ``padding``/``standardize`` that the conv's class needs (see :mod:`convert.conv_classes`).
    conv_options: Mapping[str, Any]
    #: Whether this conv asked to share its block's router (``share_routing: block``).
    share_routing: bool = False

    @classmethod
    def from_options(cls, options: Mapping[str, Any], conv_options: Mapping[str, Any], seed: int) -> ConvPlan:
        """The plan for resolved recipe ``options``; options the kind does not take are dropped (a recipe may mix
        kinds)."""
        layer = layer_class(options["kind"])
        router = {k: v for k, v in options.items() if k in layer.router_option_names()}
        return cls(
            kind=layer.kind,
            experts=int(options["experts"]),
            noise=float(options["noise"]),
            seed=seed,
            router=MappingProxyType(router),
            conv_options=MappingProxyType(dict(conv_options)),
            share_routing=options.get("share_routing") == "block",
        )

    @classmethod
    def from_record(cls, conv: Any, kind: str, options: Mapping[str, Any]) -> ConvPlan:
        """The plan that rebuilds a checkpoint's recorded layer on ``conv`` (its weights are loaded after)."""
        return cls.from_options({**options, "kind": kind, "noise": 0.0}, conversion_options(conv), seed=0)


@dataclass(frozen=True)
class Skip:
    """Why a conv stays static; ``default`` for a default skip (stem, 1x1 input, not run)."""

    reason: str
    default: bool = False


@dataclass(frozen=True)
class Selection:
    """What the decision step needs besides the conv: the recipe, the arguments it resolved, the scope."""

    recipe: Recipe
    overrides: dict[str, Any]
    seed: int
    include: list[str]
    exclude: list[str]
    shrunk: set[str] = field(default_factory=set)  # from the probe: convs whose input it shrank to 1x1
    size: tuple[int, int] = (0, 0)  # from the probe: its input size


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed: stable across runs and machines, different for every layer."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def decide(site: ConvSite, selection: Selection) -> ConvPlan | Skip:
    """The plan for one conv, or why it is skipped.

    An include glob narrows the scope; the default skips still apply inside it unless the
    conv is named exactly or a recipe rule keeps it (``skip: false``).
    """
    if is_already_dynamic(site.module):
        return Skip(f"already a dynamic conv ({type(site.module).__name__})")
    try:
        conv_options = conversion_options(site.module)
    except UnsupportedConvError as exc:
        return Skip(str(exc))
    if selection.include and not any(name_matches(p, n) for p in selection.include for n in site.names):
        return Skip("not matched by the include patterns")
    for pattern in selection.exclude:
        if any(name_matches(pattern, n) for n in site.names):
            return Skip(f"excluded by pattern {pattern!r}")
    options, skip_rule, unskipped = selection.recipe.resolve(site, selection.overrides)
    if skip_rule is not None:
        return Skip(f"skipped by recipe rule {skip_rule}")
    refusal = layer_class(options["kind"]).unsupported(conv_options)
    if refusal is not None:
        return Skip(refusal)
    if not (unskipped or named_exactly(site, selection.include)):
        default = default_skip_reason(site, selection.shrunk, selection.size)
        if default is not None:
            return Skip(default, default=True)
    return ConvPlan.from_options(options, conv_options, layer_seed(selection.seed, site.name))
