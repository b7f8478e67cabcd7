"""The listing commands: ``models``, ``recipes``, ``kinds`` and ``version``."""

from __future__ import annotations

from typing import Annotated

import torch
import typer

import dynconv

from .. import catalog
from ..models import list_models
from ..recipe import Recipe
from . import render
from .common import Debug, UsageError, command, out


@command("models")
def models_cmd(
    pattern: Annotated[str | None, typer.Argument(help="glob on model names, e.g. 'resnet*'")] = None,
    source: Annotated[str | None, typer.Option(help="torchvision or timm only")] = None,
    debug: Debug = False,
) -> None:
    """List the model names that convert can build, marked by source."""
    found = [(s, n) for s, n in list_models(pattern) if source is None or s == source]
    if not found:
        raise UsageError(f"no model name matches {pattern!r}; try a broader pattern such as '{(pattern or '')[:3]}*'")
    for src, name in found:
        out.print(f"{src:12} {name}", markup=False, highlight=False)


@command("recipes")
def recipes_cmd(debug: Debug = False) -> None:
    """List the shipped recipes with one-line descriptions."""
    recipes = {name: Recipe.from_yaml(path) for name, path in catalog.shipped_recipes().items()}
    out.print(render.recipes_table(recipes))


@command("kinds")
def kinds_cmd(debug: Debug = False) -> None:
    """List the dynamic convolution kinds: formula, routing, parameter cost, speed and options."""
    text = render.kinds_text(dynconv.LAYERS, width=out.width - 1)
    out.print(text, markup=False, highlight=False, soft_wrap=True)


@command("version")
def version_cmd(debug: Debug = False) -> None:
    """Print the dynconv and torch versions."""
    out.print(f"dynconv {dynconv.__version__} (torch {torch.__version__})", highlight=False)
