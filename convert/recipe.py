"""Recipes: which convs to convert, and how, as validated data (a dict or a YAML file).

Precedence, from weakest to strongest, for every option of every conv:
built-in defaults < the recipe's ``defaults`` < explicit arguments (``convert_model``'s
``kind``/``experts``/``noise``/``seed``, the CLI's flags) < the matching ``rules`` in
order, a later matching rule overriding an earlier one. ``skip`` follows the same
order: the last matching rule that says ``skip`` decides.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Kind = Literal["condconv", "dyconv", "dynet"]
ConvType = Literal["pointwise", "depthwise", "spatial"]
BUILTIN_DEFAULTS: dict[str, Any] = {"kind": "condconv", "experts": 4, "noise": 0.01}
ROUTER_OPTIONS = ("dropout", "reduction", "min_hidden", "temperature")


class RecipeError(ValueError):
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


class LayerOptions(_Strict):
    """Options a rule or the defaults may set; ``None`` leaves the weaker level's value."""

    kind: Kind | None = None
    experts: int | None = Field(None, ge=1, le=256)
    noise: float | None = Field(None, ge=0, le=1)
    dropout: float | None = Field(None, ge=0, lt=1)
    reduction: int | None = Field(None, ge=1)
    min_hidden: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, gt=0)

    def set_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"match", "skip", "seed"}).items() if v is not None}


class Defaults(LayerOptions):
    seed: int | None = None


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
        """Whether the conv ``site`` (a :class:`convert.graph.ConvSite`) satisfies this selector."""
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


class Rule(LayerOptions):
    match: Selector = Field(default_factory=Selector)
    skip: bool | None = None


class ModelSpec(_Strict):
    name: str
    source: Literal["torchvision", "timm", "custom"] | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)


class Recipe(_Strict):
    """A validated recipe. Build it from a dict (:meth:`from_dict`) or YAML (:meth:`from_yaml`)."""

    description: str = ""
    model: ModelSpec | None = None
    defaults: Defaults = Field(default_factory=Defaults)
    rules: list[Rule] = Field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        if not isinstance(data, dict):
            raise RecipeError(f"{source}: a recipe must be a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(_describe(exc, source, None)) from None

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
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(_describe(exc, str(path), node)) from None

    def resolve(self, site: Any, overrides: dict[str, Any]) -> tuple[dict[str, Any], int | None, bool]:
        """Options for ``site``; the index of the rule that skips it (or ``None``); and whether a
        rule explicitly keeps it (``skip: false``), which overrides the default skips (stem...)."""
        options = {**BUILTIN_DEFAULTS, **self.defaults.set_options(), **overrides}
        skip: tuple[int, bool] | None = None
        for index, rule in enumerate(self.rules):
            if rule.match.matches(site):
                options.update(rule.set_options())
                if rule.skip is not None:
                    skip = (index, rule.skip)
        if skip is None:
            return options, None, False
        return options, (skip[0] if skip[1] else None), not skip[1]


def load_recipe(recipe: Recipe | dict[str, Any] | str | Path | None) -> Recipe:
    """Accept a :class:`Recipe`, a dict, a YAML path, or ``None`` (the empty recipe)."""
    if recipe is None:
        return Recipe()
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
