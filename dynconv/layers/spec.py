"""What a kind declares about itself, so tools can be derived from the layer registry.

A layer class states its routing options as the keyword parameters of its
``_build_router`` (with defaults, types and, through ``Annotated[..., Bounds(...)]``,
their valid ranges) and describes itself with a :class:`KindInfo`. The converter's
recipe schema, the CLI's ``--kind`` choices and ``dynconv kinds`` are all built from
these, so adding a kind is one file under ``dynconv/layers/`` and one registry entry.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Bounds:
    """Valid range of a numeric option: ``Annotated[float, Bounds(ge=0, lt=1)]``."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def check(self, name: str, value: float) -> None:
        """Raise a ``ValueError`` naming ``name`` when ``value`` is out of range."""
        for bound, ok, word in (
            (self.ge, lambda b: value >= b, ">="),
            (self.gt, lambda b: value > b, ">"),
            (self.le, lambda b: value <= b, "<="),
            (self.lt, lambda b: value < b, "<"),
        ):
            if bound is not None and not ok(bound):
                raise ValueError(f"{name} must be {word} {bound}, got {value}")


@dataclass(frozen=True)
class OptionSpec:
    """One routing option of a kind: its name, Python type, default and valid range."""

    name: str
    type: type
    default: Any
    bounds: Bounds | None = None


@dataclass(frozen=True)
class KindInfo:
    """Plain-text description of a kind for ``dynconv kinds`` and the docs."""

    title: str  # the paper, e.g. "CondConv (Yang et al., NeurIPS 2019)"
    formula: str  # the per-sample kernel, e.g. "W(x) = sum_k r_k(x) W_k"
    routing: str  # how routing weights are computed
    parameters: str  # what it costs in parameters relative to the static conv
    speed: str  # where its time goes


def option_specs(build_router: Any) -> dict[str, OptionSpec]:
    """The keyword options of a ``_build_router(self, ...)`` method, in signature order."""
    signature = inspect.signature(build_router)
    hints = typing.get_type_hints(build_router, include_extras=True)
    specs: dict[str, OptionSpec] = {}
    for name, param in list(signature.parameters.items())[1:]:
        hint = hints.get(name, type(param.default))
        bounds = None
        if typing.get_origin(hint) is typing.Annotated:
            base, *extras = typing.get_args(hint)
            bounds = next((e for e in extras if isinstance(e, Bounds)), None)
            hint = base
        specs[name] = OptionSpec(name, hint, param.default, bounds)
    return specs
