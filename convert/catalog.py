"""The recipes shipped with dynconv (``recipes/*.yaml``), found by name or path."""

from __future__ import annotations

import sys
from pathlib import Path

from .recipe import RecipeError


def recipe_dirs() -> list[Path]:
    """Where shipped recipes live: the source tree (editable installs) or the install prefix."""
    source_tree = Path(__file__).resolve().parent.parent / "recipes"
    candidates = [source_tree, Path(sys.prefix) / "share" / "dynconv" / "recipes"]
    return [d for d in candidates if d.is_dir()]


def shipped_recipes() -> dict[str, Path]:
    """Recipe name (file stem) -> path, for every shipped recipe."""
    found: dict[str, Path] = {}
    for folder in recipe_dirs():
        for path in sorted(folder.glob("*.yaml")):
            found.setdefault(path.stem, path)
    return found


def find_recipe(value: str | Path) -> Path:
    """A recipe file path, or the shipped recipe called ``value`` (with or without ``.yaml``)."""
    path = Path(value)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    name = path.name.removesuffix(".yaml")
    if name in shipped and path.parent == Path("."):
        return shipped[name]
    if path.exists():
        raise RecipeError(f"recipe {value} is not a file")
    names = ", ".join(shipped) or "none"
    raise RecipeError(f"recipe {value} not found: not a file, nor a shipped recipe ({names})")
