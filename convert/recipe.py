"""Recipes: which convs to convert, and how, as validated data (a dict or a YAML file).

Precedence, from weakest to strongest, for every option of every conv:
built-in defaults < the recipe's ``defaults`` < explicit arguments (``convert_model``'s
``kind``/``experts``/``noise``/``seed``, the CLI's flags) < the matching ``rules`` in
order, a later matching rule overriding an earlier one. ``skip`` follows the same
order: the last matching rule that says ``skip`` decides.

The kinds and each kind's options are not written here: the schema is derived from the
layer registry (``dynconv.LAYERS`` and each layer's ``option_specs()``) when a recipe is
validated, so a newly registered kind is a valid ``kind:`` with its options at once.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from dynconv import LAYERS, DynamicConv2d
from dynconv.layers import canonical_kind

from .errors import UserError
from .models import ModelSource
from .options import builtin_options, default, help_text, router_option_help

ConvType = Literal["pointwise", "depthwise", "spatial"]
#: Options that apply to every kind (the rest are checked by :func:`check_kind_options`).
_SHARED_OPTIONS = frozenset({"kind", "noise", "seed", "share_routing"})


class RecipeError(UserError):
    """A recipe that cannot be read or does not validate; the message names file, line and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, (str, int)) else value


def name_matches(pattern: str, name: str) -> bool:
    """Glob on the qualified name, or a full-match regex when prefixed ``re:``."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


class CommonOptions(_Strict):
    """Options of every kind a rule or the defaults may set; ``None`` leaves the weaker level's value.

    The kinds' own options (``dropout``, ``temperature`` ...) are added from the registry
    by :func:`layer_options_model`.
    """

    kind: str | None = Field(None, description=help_text("kind"))
    experts: int | None = Field(None, ge=1, le=256, description=help_text("experts"))
    noise: float | None = Field(None, ge=0, le=1, description=help_text("noise"))
    #: ``block``: the converted convs of one block share one router (see :mod:`convert.sharing`).
    share_routing: Literal["none", "block"] | None = Field(None, description=help_text("share_routing"))

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, kind: str | None) -> str | None:
        return None if kind is None else canonical_kind(kind)

    def set_options(self) -> dict[str, Any]:
        """The options this level sets (those not left at ``None``)."""
        return {k: v for k, v in self.model_dump(exclude={"match", "skip", "seed"}).items() if v is not None}


def kind_options(kind: str) -> tuple[str, ...]:
    """The options ``kind`` takes besides ``kind``/``noise``/``seed``/``share_routing``: ``experts``
    when it has a bank of experts, then its router options."""
    cls = LAYERS[kind]
    return (("experts",) if cls.has_experts else ()) + cls.router_option_names()


def _refuse_foreign(options: dict[str, Any], kinds: set[str], where: str, error: type[UserError]) -> None:
    """Raise ``error`` when an option of ``options`` is taken by none of ``kinds`` (it would be ignored)."""
    for option in options:
        if option in _SHARED_OPTIONS or any(option in kind_options(k) for k in kinds):
            continue
        if option == "experts" and options[option] == 1 and not any(LAYERS[k].has_experts for k in kinds):
            continue  # one expert is what a kind without a bank has: nothing is ignored
        takes = "; ".join(f"{k} takes {', '.join(kind_options(k)) or 'no option of its own'}" for k in sorted(kinds))
        reason = " (it has no experts)" if option == "experts" and len(kinds) == 1 else ""
        named = " or ".join(sorted(kinds))
        raise error(f"{where}kind {named} does not take {option}{reason}, so it would be ignored; {takes}")


def check_kind_options(
    recipe: Recipe, overrides: dict[str, Any] | None = None, source: str = "recipe"
) -> dict[str, Any]:
    """The one check that every option given applies to its kind; returns ``overrides`` with the kind's
    registered spelling.

    The recipe's levels are checked against the recipe's kinds (its defaults' kind, or a rule's
    own kind, plus the kinds its rules switch to); ``overrides`` (the CLI's flags, ``convert_model``'s
    arguments) against the kind they resolve to. ``convert_model``, the CLI and recipe validation
    all call this, so ``--kind dcd --experts 8`` fails alike everywhere.
    """
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "kind" in given:
        try:
            given["kind"] = canonical_kind(given["kind"])
        except ValueError as exc:
            raise UserError(str(exc)) from None
    own_kind = recipe.defaults.kind or default("kind")
    switched = {rule.kind for rule in recipe.rules if rule.kind is not None}
    _refuse_foreign(recipe.defaults.set_options(), {own_kind, *switched}, f"{source}: defaults: ", RecipeError)
    for index, rule in enumerate(recipe.rules):
        kinds = {rule.kind} if rule.kind is not None else {own_kind, *switched}
        _refuse_foreign(rule.set_options(), kinds, f"{source}: rules[{index}]: ", RecipeError)
    _refuse_foreign(given, {given.get("kind", own_kind), *switched}, "", UserError)
    return given


def _kind_option_fields(layers: tuple[type[DynamicConv2d], ...]) -> dict[str, Any]:
    """Pydantic fields for the union of the kinds' options, with each option's valid range."""
    fields: dict[str, Any] = {}
    for cls in layers:
        for spec in cls.option_specs().values():
            if spec.name in fields:
                continue
            b = spec.bounds
            limits = {} if b is None else {"ge": b.ge, "gt": b.gt, "le": b.le, "lt": b.lt}
            fields[spec.name] = (
                spec.type | None,
                Field(None, description=router_option_help(spec.name, layers), **limits),
            )
    return fields


class Selector(_Strict):
    """Which convs a rule applies to; every given criterion must hold (an empty selector matches all).

    ``channels`` means the conv's output channels; ``min_input_size`` the smaller side
    of its input map in the probe forward.
    """

    name: list[str] | None = None
    type: list[ConvType] | None = None
    min_channels: int | None = Field(None, ge=1)
    max_channels: int | None = Field(None, ge=1)
    min_input_size: int | None = Field(None, ge=1)
    stride: list[int] | None = None

    @field_validator("name", "type", "stride", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return _as_list(value)

    @field_validator("name")
    @classmethod
    def _valid_regex(cls, patterns: list[str] | None) -> list[str] | None:
        for pattern in patterns or []:
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return patterns

    def matches(self, site: Any) -> bool:
        """Whether the conv ``site`` (a :class:`convert.probe.ConvSite`) satisfies this selector."""
        if self.name is not None and not any(name_matches(p, n) for p in self.name for n in site.names):
            return False
        if self.type is not None and site.conv_type not in self.type:
            return False
        if self.min_channels is not None and site.out_channels < self.min_channels:
            return False
        if self.max_channels is not None and site.out_channels > self.max_channels:
            return False
        if self.min_input_size is not None and (site.input_hw is None or min(site.input_hw) < self.min_input_size):
            return False
        return self.stride is None or max(site.stride) in self.stride


@functools.cache
def recipe_schema(layers: tuple[type[DynamicConv2d], ...]) -> type[Recipe]:
    """The :class:`Recipe` model whose rules and defaults accept the options of ``layers``."""
    options = create_model("LayerOptions", __base__=CommonOptions, **_kind_option_fields(layers))
    defaults = create_model("Defaults", __base__=options, seed=(int | None, Field(None, description=help_text("seed"))))
    rule = create_model(
        "Rule", __base__=options, match=(Selector, Field(default_factory=Selector)), skip=(bool | None, None)
    )
    return create_model(
        "Recipe",
        __base__=Recipe,
        defaults=(defaults, Field(default_factory=defaults)),
        rules=(list[rule], Field(default_factory=list)),
    )


class Recipe(_Strict):
    """A validated recipe. Build it from a dict (:meth:`from_dict`) or YAML (:meth:`from_yaml`)."""

    description: str = ""
    model: ModelSource | None = None
    # Typed by recipe_schema from the registry; build recipes with from_dict/from_yaml/load_recipe.
    defaults: Any = Field(default_factory=lambda: _current_schema().model_fields["defaults"].default_factory())
    rules: list[Any] = Field(default_factory=list)

    @staticmethod
    def validate_data(data: Any, source: str, node: yaml.Node | None = None) -> Recipe:
        """Validate ``data`` against the schema of the kinds registered now."""
        try:
            recipe = _current_schema().model_validate(data)
        except ValidationError as exc:
            raise RecipeError(_describe(exc, source, node)) from None
        check_kind_options(recipe, source=source)
        return recipe

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        """A recipe from a mapping (as YAML would give it); errors name ``source`` and the key."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
        return cls.validate_data(data, source)

    def options(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        """Built-in defaults < this recipe's defaults < ``overrides``: what a conv no rule matches gets."""
        return {**builtin_options(), **self.defaults.set_options(), **(overrides or {})}

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise RecipeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise RecipeError(f"{path}{where}: YAML syntax error: {problem}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping at the top level, got {type(data).__name__}")
        return cls.validate_data(data, str(path), node)

    def resolve(self, site: Any, overrides: dict[str, Any]) -> tuple[dict[str, Any], int | None, bool]:
        """Options for ``site``; the index of the rule that skips it (or ``None``); and whether a
        rule explicitly keeps it (``skip: false``), which overrides the default skips (stem...)."""
        options = self.options(overrides)
        skip: tuple[int, bool] | None = None
        for index, rule in enumerate(self.rules):
            if rule.match.matches(site):
                options.update(rule.set_options())
                if rule.skip is not None:
                    skip = (index, rule.skip)
        if skip is None:
            return options, None, False
        return options, (skip[0] if skip[1] else None), not skip[1]


def _current_schema() -> type[Recipe]:
    """The recipe schema for the kinds registered now (cached per registry state)."""
    return recipe_schema(tuple(LAYERS.values()))


def recipe_json_schema() -> dict[str, Any]:
    """The JSON schema of a recipe for the kinds registered now; each option's description names its default."""
    return _current_schema().model_json_schema()


def load_recipe(recipe: Recipe | dict[str, Any] | str | Path | None) -> Recipe:
    """Accept a :class:`Recipe`, a dict, a YAML path, or ``None`` (the empty recipe)."""
    if recipe is None:
        return _current_schema()()
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return Recipe.from_dict(recipe)
    if isinstance(recipe, (str, Path)):
        return Recipe.from_yaml(recipe)
    raise RecipeError(f"a recipe must be a Recipe, a dict or a path, got {type(recipe).__name__}")


def _describe(exc: ValidationError, source: str, node: yaml.Node | None) -> str:
    """One sentence per problem: file, line, key path and what is wrong."""
    problems = []
    for error in exc.errors():
        loc = [p for p in error["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
        line = _line_of(node, loc)
        where = f"{source}, line {line}" if line else source
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "value_error":
            message = str(error.get("ctx", {}).get("error", message))
        elif error["type"] == "literal_error":
            message = f"{message}, got {error.get('input')!r}"
        problems.append(f"{where}: {path or '(top level)'}: {message}")
    return "; ".join(problems)


def _line_of(node: yaml.Node | None, loc: list[Any]) -> int | None:
    """1-based line of the YAML node at key path ``loc``, as far down as it exists."""
    line = None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == key), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            break
    return line
