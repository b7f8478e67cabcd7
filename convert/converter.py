"""``convert_model``: a copy of a model with the chosen convs turned dynamic, same function.

Steps: copy the model, find its convs and probe their shapes with one forward,
decide per conv (recipe, include/exclude, default skips), build each dynamic layer
from the conv's weights, put it in place under every name the conv had, and count
parameters and MACs before and after.
"""

from __future__ import annotations

import copy
import difflib
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from dynconv import LAYERS

from .conv_classes import UnsupportedConvError, conversion_options
from .counting import count_macs, count_params
from .errors import UserError
from .models import ModelSource, base_of
from .probe import ConvSite, default_input_size, find_convs, is_already_dynamic, probe
from .recipe import Recipe, load_recipe, name_matches
from .surgery import build_layer, replace_all

CONVERSION_ATTR = "dynconv_conversion"


class SelectionError(UserError):
    """An include/exclude/rule pattern matches no conv; the message lists close names."""


@dataclass
class LayerRecord:
    """One converted conv: where it is, what it became, and what it costs before and after."""

    name: str
    aliases: list[str]
    kind: str
    experts: int
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    conv_type: str
    input_hw: tuple[int, int] | None
    output_hw: tuple[int, int] | None
    params_before: int
    params_after: int
    macs_before: int | None
    macs_after: int | None
    options: dict[str, Any]
    seed: int
    noise: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SkipRecord:
    """One conv left static, and why."""

    name: str
    aliases: list[str]
    reason: str
    kernel: tuple[int, int]
    in_channels: int
    out_channels: int
    input_hw: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Conversion:
    """What a converted model records about itself, so it can be saved after training."""

    base: ModelSource
    recipe: dict[str, Any]
    input_shape: tuple[int, int, int]
    layers: list[dict[str, Any]] = field(default_factory=list)  # {"names", "kind", "options"}


@dataclass
class ConversionResult:
    """The converted model, one record per converted and per skipped conv, and totals."""

    model: nn.Module
    layers: list[LayerRecord]
    skipped: list[SkipRecord]
    base: ModelSource
    recipe: dict[str, Any]
    input_shape: tuple[int, int, int]
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int

    @property
    def totals(self) -> dict[str, Any]:
        """Whole-model parameters and MACs (batch 1 at ``input_shape``) before and after."""
        return {
            "converted": len(self.layers),
            "skipped": len(self.skipped),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_after / max(self.params_before, 1),
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_increase": self.macs_after / max(self.macs_before, 1) - 1,
        }


def layer_seed(seed: int, name: str) -> int:
    """A per-layer seed: stable across runs and machines, different for every layer."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def _input_shape(model: nn.Module, input_size: int | tuple[int, ...] | None) -> tuple[int, int, int]:
    channels, height, width = default_input_size(model)
    if input_size is None:
        return (channels, height, width)
    if isinstance(input_size, int):
        return (channels, input_size, input_size)
    size = tuple(int(v) for v in input_size)
    if len(size) == 2:
        return (channels, size[0], size[1])
    if len(size) == 3:
        return (size[0], size[1], size[2])
    raise UserError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")


def _check_patterns(patterns: list[str], sites: list[ConvSite], what: str) -> None:
    names = [n for site in sites for n in site.names]
    for pattern in patterns:
        if not any(name_matches(pattern, n) for n in names):
            stem = pattern.removeprefix("re:").replace("*", "").replace("?", "")
            close = difflib.get_close_matches(stem, names, n=5, cutoff=0.4)
            hint = f" Close conv names: {', '.join(close)}." if close else ""
            raise SelectionError(f"{what} pattern {pattern!r} matches no conv in the model.{hint}")


def _soft_skip_reason(site: ConvSite) -> str | None:
    """Default reasons to leave a conv alone; an explicit include overrides them."""
    if site.calls == 0:
        return "not run by the probe forward (e.g. a training-only auxiliary head)"
    if site.reads_image:
        return "stem: reads the image channels"
    if site.input_hw is not None and site.input_hw == (1, 1):
        return "input is 1x1 spatially (a squeeze-excite style gate): nothing to gain"
    return None


def convert_model(
    model: nn.Module,
    recipe: Recipe | dict[str, Any] | str | None = None,
    kind: str | None = None,
    experts: int | None = None,
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
    seed: int | None = None,
    *,
    noise: float | None = None,
    input_size: int | tuple[int, ...] | None = None,
) -> ConversionResult:
    """Convert the selected convs of a copy of ``model``; ``model`` itself is not modified.

    ``kind`` (default ``condconv``), ``experts`` (default 4), ``noise`` and ``seed``
    override the recipe's defaults; ``include``/``exclude`` are globs (or ``re:``
    regexes) on qualified names. ``input_size`` is the probe forward's size (default:
    the model's own, e.g. 224).
    """
    spec = load_recipe(recipe)
    if kind is not None and kind not in LAYERS:
        raise UserError(f"unknown kind {kind!r}; choose from {', '.join(LAYERS)}")
    if experts is not None and (not isinstance(experts, int) or experts < 1):
        raise UserError(f"experts must be a positive integer, got {experts!r}")
    if noise is not None and noise < 0:
        raise UserError(f"noise must be >= 0, got {noise}")
    overrides = {k: v for k, v in {"kind": kind, "experts": experts, "noise": noise}.items() if v is not None}
    seed = seed if seed is not None else (spec.defaults.seed or 0)
    include = [include] if isinstance(include, str) else list(include or [])
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])

    base = base_of(model)
    try:
        converted = copy.deepcopy(model)
    except RuntimeError as exc:
        if "graph leaves" not in str(exc):
            raise
        raise UserError(
            f"the model cannot be copied, and dynconv never modifies the model it is given ({exc}); "
            "old-style torch.nn.utils.weight_norm is a common cause: use torch.nn.utils.parametrizations.weight_norm"
        ) from None
    sites = find_convs(converted)
    shape = _input_shape(model, input_size)
    probe(converted, sites, shape)
    _check_patterns(include, sites, "include")
    _check_patterns(exclude, sites, "exclude")
    for index, rule in enumerate(spec.rules):
        _check_patterns(rule.match.name or [], sites, f"recipe rule {index}")

    layers: list[LayerRecord] = []
    skipped: list[SkipRecord] = []
    conversion = Conversion(base, {**spec.model_dump(), "overrides": overrides, "seed": seed}, shape)
    for site in sites:
        reason, options = _decide(site, spec, overrides, include, exclude)
        if reason is not None:
            skipped.append(
                SkipRecord(
                    site.name, site.names[1:], reason, site.kernel, site.in_channels, site.out_channels, site.input_hw
                )
            )
            continue
        conv = site.module
        this_seed = layer_seed(seed, site.name)
        layer = build_layer(conv, options["kind"], options, noise=float(options["noise"]), seed=this_seed)
        replace_all(converted, site.names, layer)
        conversion.layers.append({"names": site.names, "kind": layer.kind, "options": layer.layer_options()})
        layers.append(
            LayerRecord(
                name=site.name,
                aliases=site.names[1:],
                kind=layer.kind,
                experts=layer.experts,
                in_channels=site.in_channels,
                out_channels=site.out_channels,
                kernel=site.kernel,
                stride=site.stride,
                groups=site.groups,
                conv_type=site.conv_type,
                input_hw=site.input_hw,
                output_hw=site.output_hw,
                params_before=count_params(conv),
                params_after=count_params(layer),
                macs_before=None if site.input_shape is None else count_macs(conv, site.input_shape),
                macs_after=None if site.input_shape is None else count_macs(layer, site.input_shape),
                options=layer.layer_options(),
                seed=this_seed,
                noise=float(options["noise"]),
            )
        )
    setattr(converted, CONVERSION_ATTR, conversion)
    return ConversionResult(
        model=converted,
        layers=layers,
        skipped=skipped,
        base=base,
        recipe=conversion.recipe,
        input_shape=shape,
        params_before=count_params(model),
        params_after=count_params(converted),
        macs_before=count_macs(model, shape),
        macs_after=count_macs(converted, shape),
    )


def _decide(
    site: ConvSite, spec: Recipe, overrides: dict[str, Any], include: list[str], exclude: list[str]
) -> tuple[str | None, dict[str, Any]]:
    """``(reason to skip or None, resolved options)`` for one conv."""
    if is_already_dynamic(site.module):
        return f"already a dynamic conv ({type(site.module).__name__})", {}
    try:
        extra = conversion_options(site.module)
    except UnsupportedConvError as exc:
        return str(exc), {}
    included = any(name_matches(p, n) for p in include for n in site.names)
    if include and not included:
        return "not matched by the include patterns", {}
    for pattern in exclude:
        if any(name_matches(pattern, n) for n in site.names):
            return f"excluded by pattern {pattern!r}", {}
    options, skip_rule, unskipped = spec.resolve(site, overrides)
    if skip_rule is not None:
        return f"skipped by recipe rule {skip_rule}", options
    refusal = LAYERS[options["kind"]].unsupported(extra)
    if refusal is not None:
        return refusal, options
    if not (included or unskipped):
        soft = _soft_skip_reason(site)
        if soft is not None:
            return soft, options
    return None, options
