"""``convert_model``: a copy of a model with the chosen convs turned dynamic, same function.

Steps: copy the model, find its convs and probe their shapes with one forward,
decide per conv (recipe, include/exclude, default skips), build each dynamic layer
from the conv's weights, put it in place under every name the conv had, and count
parameters and MACs before and after.
"""

from __future__ import annotations

import copy
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from dynconv import LAYERS, DynamicConv2d
from dynconv.shared_routing import count_routers

from .conv_classes import UnsupportedConvError, conversion_options
from .counting import count_macs, count_params
from .errors import UserError
from .heads import replace_head
from .identify import base_of
from .models import ModelSource
from .probe import ConvSite, default_input_size, find_convs, is_already_dynamic, probe
from .recipe import Recipe, check_kind_options, load_recipe, name_matches
from .selection import (
    RuleReport,
    check_patterns,
    default_skip_reason,
    named_exactly,
    nothing_converted,
    shrunk_by_probe,
)
from .sharing import SharingPlan, check_mode, share_blocks
from .surgery import build_layer, replace_all

CONVERSION_ATTR = "dynconv_conversion"


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
    routing_block: str | None = None  # the block whose one router this conv shares (share_routing: block)

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
    default: bool = False  # a default skip (stem, 1x1 input, not run): forced by an exact name or a rule

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ConversionWarning:
    """Something the user should know about a conversion that succeeded (e.g. a probe size too small)."""

    message: str
    cli_hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Conversion:
    """What a converted model records about itself, so it can be saved after training."""

    base: ModelSource
    recipe: dict[str, Any]
    input_shape: tuple[int, int, int]
    layers: list[dict[str, Any]] = field(default_factory=list)  # {"names", "kind", "options"}
    sharing: list[dict[str, Any]] = field(default_factory=list)  # {"block", "block_type", "layers"}
    head: dict[str, Any] | None = None  # a new classifier head: {"num_classes", "layers"}
    collapsed: list[str] = field(default_factory=list)  # layers turned back into static convs (convert.collapse)


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
    sharing: SharingPlan | None = None  # with share_routing: block, which convs share a router and why
    #: What the converted model is checked against: the input model, or a copy of it with the new head.
    reference: nn.Module | None = None
    head: dict[str, Any] | None = None
    rules: list[RuleReport] = field(default_factory=list)
    warnings: list[ConversionWarning] = field(default_factory=list)

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
            "routers": count_routers(self.model),
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
    share_routing: str | None = None,
    num_classes: int | None = None,
) -> ConversionResult:
    """Convert the selected convs of a copy of ``model``; ``model`` itself is not modified.

    ``num_classes`` gives the copy a new classifier head for that many classes first
    (seeded by ``seed``; recorded, so the checkpoint rebuilds it); ``result.reference``
    is then the unconverted model with that same head, what the conversion preserves.
    ``kind`` (default ``condconv``), ``experts`` (default 4), ``noise`` and ``seed``
    override the recipe's defaults; ``include``/``exclude`` are globs (or ``re:``
    regexes) on qualified names. ``input_size`` is the probe forward's size (default:
    the model's own, e.g. 224). ``share_routing="block"`` makes the converted convs of
    each block share one router fed by the block's input (see :mod:`convert.sharing`).
    """
    spec = load_recipe(recipe)
    if experts is not None and (not isinstance(experts, int) or experts < 1):
        raise UserError(f"experts must be a positive integer, got {experts!r}")
    if noise is not None and noise < 0:
        raise UserError(f"noise must be >= 0, got {noise}")
    given = {"kind": kind, "experts": experts, "noise": noise, "share_routing": check_mode(share_routing)}
    overrides = check_kind_options(spec, given)  # --kind DyConv is dyconv; dcd takes no experts
    seed = seed if seed is not None else (spec.defaults.seed or 0)
    include = [include] if isinstance(include, str) else list(include or [])
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or [])

    base = base_of(model)
    reference, head = model, None
    if num_classes is not None:
        reference = _copy(model)
        head = {"num_classes": num_classes, "layers": replace_head(reference, num_classes, seed)}
    converted = _copy(reference)
    sites = find_convs(converted)
    shape = _input_shape(model, input_size)
    probe(converted, sites, shape)
    rules = check_patterns(include, exclude, spec, sites)
    shrunk = shrunk_by_probe(converted, sites, shape, default_input_size(model))

    layers: list[LayerRecord] = []
    skipped: list[SkipRecord] = []
    conversion = Conversion(base, {**spec.model_dump(), "overrides": overrides, "seed": seed}, shape, head=head)
    built: dict[str, DynamicConv2d] = {}
    wanted: dict[str, bool] = {}
    for site in sites:
        reason, options, default = _decide(site, spec, overrides, include, exclude, shrunk, shape[1:])
        if reason is not None:
            skipped.append(
                SkipRecord(
                    site.name,
                    site.names[1:],
                    reason,
                    site.kernel,
                    site.in_channels,
                    site.out_channels,
                    site.input_hw,
                    default,
                )
            )
            continue
        conv = site.module
        this_seed = layer_seed(seed, site.name)
        layer = build_layer(conv, options["kind"], options, noise=float(options["noise"]), seed=this_seed)
        replace_all(converted, site.names, layer)
        built[site.name], wanted[site.name] = layer, options.get("share_routing") == "block"
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
    if not layers:
        raise nothing_converted(skipped)
    notes = _warnings(skipped, shrunk, shape, rules)
    for note in notes:
        warnings.warn(note.message, ConversionWarningCategory, stacklevel=2)
    sharing = None
    if any(wanted.values()):
        sharing = share_blocks(converted, built, wanted, {r.name: r for r in layers}, shape)
        conversion.sharing = [g.to_dict() for g in sharing.groups]
    setattr(converted, CONVERSION_ATTR, conversion)
    return ConversionResult(
        model=converted,
        layers=layers,
        skipped=skipped,
        base=base,
        recipe=conversion.recipe,
        input_shape=shape,
        params_before=count_params(reference),
        params_after=count_params(converted),
        macs_before=count_macs(reference, shape),
        macs_after=count_macs(converted, shape),
        sharing=sharing,
        reference=reference,
        head=head,
        rules=rules,
        warnings=notes,
    )


class ConversionWarningCategory(UserWarning):
    """The category of the Python warnings ``convert_model`` issues (also in ``result.warnings``)."""


def _copy(model: nn.Module) -> nn.Module:
    try:
        return copy.deepcopy(model)
    except RuntimeError as exc:
        if "graph leaves" not in str(exc):
            raise
        raise UserError(
            f"the model cannot be copied, and dynconv never modifies the model it is given ({exc}); "
            "old-style torch.nn.utils.weight_norm is a common cause: use torch.nn.utils.parametrizations.weight_norm"
        ) from None


def _warnings(
    skipped: list[SkipRecord], shrunk: set[str], shape: tuple[int, int, int], rules: list[RuleReport]
) -> list[ConversionWarning]:
    """A too small probe size (names the convs it left static), and recipe rules that matched nothing."""
    notes = []
    small = [s.name for s in skipped if s.name in shrunk and s.default]
    if small:
        shown = ", ".join(small[:6]) + (f" and {len(small) - 6} more" if len(small) > 6 else "")
        notes.append(
            ConversionWarning(
                f"at the probe size {shape[1]}x{shape[2]} the feature map shrinks to 1x1 before {len(small)} "
                f"conv(s), left static: {shown}; a larger input size converts them",
                cli_hint="--input-size",
            )
        )
    for rule in rules:
        if rule.convs == 0:
            notes.append(ConversionWarning(f"recipe rule {rule.index} ({rule.match}) matches no conv"))
    return notes


def _decide(
    site: ConvSite,
    spec: Recipe,
    overrides: dict[str, Any],
    include: list[str],
    exclude: list[str],
    shrunk: set[str],
    size: tuple[int, int],
) -> tuple[str | None, dict[str, Any], bool]:
    """``(reason to skip or None, resolved options, whether it is a default skip)`` for one conv.

    An include glob narrows the scope; the default skips still apply inside it unless the
    conv is named exactly or a recipe rule keeps it (``skip: false``).
    """
    if is_already_dynamic(site.module):
        return f"already a dynamic conv ({type(site.module).__name__})", {}, False
    try:
        extra = conversion_options(site.module)
    except UnsupportedConvError as exc:
        return str(exc), {}, False
    if include and not any(name_matches(p, n) for p in include for n in site.names):
        return "not matched by the include patterns", {}, False
    for pattern in exclude:
        if any(name_matches(pattern, n) for n in site.names):
            return f"excluded by pattern {pattern!r}", {}, False
    options, skip_rule, unskipped = spec.resolve(site, overrides)
    if skip_rule is not None:
        return f"skipped by recipe rule {skip_rule}", options, False
    refusal = LAYERS[options["kind"]].unsupported(extra)
    if refusal is not None:
        return refusal, options, False
    if not (unskipped or named_exactly(site, include)):
        default = default_skip_reason(site, shrunk, size)
        if default is not None:
            return default, options, True
    return None, options, False
