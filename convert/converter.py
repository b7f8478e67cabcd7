"""``convert_model``: a copy of a model with the chosen convs turned dynamic, same function.

Steps: copy the model, find its convs and probe their shapes with one forward,
decide per conv (recipe, include/exclude, default skips), build each dynamic layer
from the conv's weights, put it in place under every name the conv had, and count
parameters and MACs before and after.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from dynconv import DynamicConv2d
from dynconv.shared_routing import count_routers

from .counting import count_macs, count_params
from .errors import UserError
from .heads import replace_head
from .identify import base_of
from .models import ModelSource
from .options import default
from .plan import ConvPlan, Selection, Skip, decide
from .probe import ConvSite, default_input_size, find_convs, probe
from .recipe import Recipe, check_kind_options, load_recipe
from .selection import RuleReport, check_patterns, nothing_converted, shrunk_by_probe
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
    ``kind``, ``experts``, ``noise`` and ``seed`` override the recipe's defaults (the
    built-in ones, with their help, are in :mod:`convert.options`);
    ``include``/``exclude`` are globs (or ``re:`` regexes) on qualified names. ``input_size``
    is the probe forward's size (default: the model's own, e.g. 224). ``share_routing="block"``
    makes the converted convs of each block share one router fed by the block's input
    (see :mod:`convert.sharing`).

    The stages, in order: check the arguments against the recipe; identify the base
    model; give the copy its new head; probe the convs' shapes; decide each conv's plan;
    build and put each layer in place, recording it; warn; share routers within blocks.
    """
    selection = _check_arguments(recipe, kind, experts, noise, seed, include, exclude, share_routing)
    base = base_of(model)
    reference, head = _with_new_head(model, num_classes, selection.seed)
    converted = _copy(reference)
    sites, shape, selection, rules = _probe(model, converted, input_size, selection)
    decisions = [(site, decide(site, selection)) for site in sites]
    built = _build_and_replace(converted, decisions)
    if not built.records:
        raise nothing_converted(built.skipped)
    notes = _warnings(built.skipped, selection.shrunk, shape, rules)
    for note in notes:
        warnings.warn(note.message, ConversionWarningCategory, stacklevel=2)
    recorded = [
        {"names": [r.name, *r.aliases], "kind": r.kind, "options": built.layers[r.name].layer_options()}
        for r in built.records
    ]
    sharing = _share_routers(converted, built, shape)
    conversion = Conversion(
        base,
        {**selection.recipe.model_dump(), "overrides": selection.overrides, "seed": selection.seed},
        shape,
        layers=recorded,
        sharing=[] if sharing is None else [g.to_dict() for g in sharing.groups],
        head=head,
    )
    setattr(converted, CONVERSION_ATTR, conversion)
    return ConversionResult(
        model=converted,
        layers=built.records,
        skipped=built.skipped,
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


def _check_arguments(
    recipe: Recipe | dict[str, Any] | str | None,
    kind: str | None,
    experts: int | None,
    noise: float | None,
    seed: int | None,
    include: list[str] | str | None,
    exclude: list[str] | str | None,
    share_routing: str | None,
) -> Selection:
    """The recipe and the arguments, checked and resolved before any work (``--kind DyConv`` is dyconv; dcd
    takes no experts); the probe's findings are added by :func:`_probe`."""
    spec = load_recipe(recipe)
    if experts is not None and (not isinstance(experts, int) or experts < 1):
        raise UserError(f"experts must be a positive integer, got {experts!r}")
    if noise is not None and noise < 0:
        raise UserError(f"noise must be >= 0, got {noise}")
    given = {"kind": kind, "experts": experts, "noise": noise, "share_routing": check_mode(share_routing)}
    if seed is None:
        seed = spec.defaults.seed if spec.defaults.seed is not None else default("seed")
    return Selection(
        recipe=spec,
        overrides=check_kind_options(spec, given),
        seed=seed,
        include=[include] if isinstance(include, str) else list(include or []),
        exclude=[exclude] if isinstance(exclude, str) else list(exclude or []),
    )


def _with_new_head(model: nn.Module, num_classes: int | None, seed: int) -> tuple[nn.Module, dict[str, Any] | None]:
    """What the conversion preserves: ``model`` itself, or a copy with a new (seeded) head for ``num_classes``."""
    if num_classes is None:
        return model, None
    reference = _copy(model)
    return reference, {"num_classes": num_classes, "layers": replace_head(reference, num_classes, seed)}


def _probe(
    model: nn.Module, converted: nn.Module, input_size: int | tuple[int, ...] | None, selection: Selection
) -> tuple[list[ConvSite], tuple[int, int, int], Selection, list[RuleReport]]:
    """The convs of ``converted`` with their shapes from one forward at the probe size; the selection with the
    probe's findings; and each recipe rule's report (a pattern that matches no conv is an error here)."""
    sites = find_convs(converted)
    shape = _input_shape(model, input_size)
    probe(converted, sites, shape)
    rules = check_patterns(selection.include, selection.exclude, selection.recipe, sites)
    shrunk = shrunk_by_probe(converted, sites, shape, default_input_size(model))
    return sites, shape, replace(selection, shrunk=shrunk, size=shape[1:]), rules


@dataclass
class _Built:
    """The outcome of the build stage: the new layers by name, their records, and the convs left static."""

    layers: dict[str, DynamicConv2d] = field(default_factory=dict)
    plans: dict[str, ConvPlan] = field(default_factory=dict)
    records: list[LayerRecord] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)


def _build_and_replace(converted: nn.Module, decisions: list[tuple[ConvSite, ConvPlan | Skip]]) -> _Built:
    """Build each planned layer from its conv and put it under every name the conv had; record every conv."""
    built = _Built()
    for site, decision in decisions:
        if isinstance(decision, Skip):
            built.skipped.append(_skip_record(site, decision))
            continue
        layer = build_layer(site.module, decision)
        replace_all(converted, site.names, layer)
        built.layers[site.name], built.plans[site.name] = layer, decision
        built.records.append(_layer_record(site, layer, decision))
    return built


def _layer_record(site: ConvSite, layer: DynamicConv2d, plan: ConvPlan) -> LayerRecord:
    """Where a converted conv is, what it became, and its parameters and MACs before and after."""
    conv = site.module
    return LayerRecord(
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
        seed=plan.seed,
        noise=plan.noise,
    )


def _skip_record(site: ConvSite, skip: Skip) -> SkipRecord:
    """A conv left static, and why."""
    return SkipRecord(
        site.name,
        site.names[1:],
        skip.reason,
        site.kernel,
        site.in_channels,
        site.out_channels,
        site.input_hw,
        skip.default,
    )


def _share_routers(converted: nn.Module, built: _Built, shape: tuple[int, int, int]) -> SharingPlan | None:
    """With ``share_routing: block``, one router per block for the convs that asked for it; else ``None``."""
    wanted = {name: plan.share_routing for name, plan in built.plans.items()}
    if not any(wanted.values()):
        return None
    return share_blocks(converted, built.layers, wanted, {r.name: r for r in built.records}, shape)


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
