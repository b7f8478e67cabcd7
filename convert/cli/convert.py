"""``dynconv convert``: build a model, convert its convs, verify, write a checkpoint."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

import dynconv

from .. import catalog
from ..checkpoint import save_checkpoint
from ..converter import ConversionWarningCategory, convert_model
from ..models import build_model, resolve_source
from ..options import help_text
from ..recipe import Recipe, check_kind_options, load_recipe
from ..sharing import SHARE_MODES
from ..verify import compare
from ..weights import load_weights
from . import render
from .common import Debug, Json, UsageError, check_output, command, err, out, step, steps, tolerance_error


def default_output(model: str, kind: str, experts: int) -> Path:
    """``MODEL-KIND-KE.safetensors``, e.g. ``resnet18-condconv-4e.safetensors``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.rsplit(":", 1)[-1].rsplit(".", 1)[-1])
    return Path(f"{stem}-{kind}-{experts}e.safetensors")


def _load_recipe(recipe: str | None) -> Recipe | None:
    return None if recipe is None else Recipe.from_yaml(catalog.find_recipe(recipe))


@command("convert")
def convert_cmd(
    model: Annotated[
        str | None,
        typer.Argument(
            help="torchvision or timm name, or package.module:factory (optional when the recipe names a model)"
        ),
    ] = None,
    experts: Annotated[int | None, typer.Option("--experts", "-k", help=help_text("experts"))] = None,
    kind: Annotated[str | None, typer.Option(help=help_text("kind"))] = None,
    recipe: Annotated[str | None, typer.Option(help="YAML recipe file, or a shipped recipe name")] = None,
    include: Annotated[list[str] | None, typer.Option(help="convert only convs matching (glob or re:regex)")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="leave convs matching alone")] = None,
    weights: Annotated[Path | None, typer.Option(help="original weights (.safetensors, .pth, .pt)")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="download the zoo's pretrained weights")] = False,
    num_classes: Annotated[
        int | None,
        typer.Option("--num-classes", help="replace the classifier head with a new one for N classes"),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="checkpoint to write")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing output")] = False,
    seed: Annotated[int | None, typer.Option(help=help_text("seed"))] = None,
    noise: Annotated[float | None, typer.Option(help=help_text("noise"))] = None,
    input_size: Annotated[int | None, typer.Option(help="probe/verification image size (default: the model's)")] = None,
    share_routing: Annotated[str | None, typer.Option(help=help_text("share_routing"))] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="show the plan, write nothing")] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="skip comparing converted and original outputs")
    ] = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Convert MODEL's convs to dynamic convs from its weights, verify, and write a checkpoint."""

    def plan() -> tuple[str, dict[str, Any], Recipe | None, Path]:  # every check before any work
        if weights is not None and pretrained:
            raise UsageError("choose one of --weights FILE and --pretrained")
        if experts is not None and experts < 1:
            raise UsageError(f"--experts must be at least 1, got {experts}")
        if num_classes is not None and num_classes < 1:
            raise UsageError(f"--num-classes must be at least 1, got {num_classes}")
        if share_routing is not None and share_routing not in SHARE_MODES:
            raise UsageError(f"--share-routing must be one of {', '.join(SHARE_MODES)}, got {share_routing!r}")
        if weights is not None and not weights.is_file():
            raise UsageError(f"weights file {weights} does not exist")
        spec = _load_recipe(recipe)
        name, kwargs = model, {}
        if spec is not None and spec.model is not None and (name is None or name == spec.model.name):
            name, kwargs = spec.model.name, dict(spec.model.kwargs)
        if name is None:
            raise UsageError("name a MODEL (e.g. resnet18), or a --recipe that names one")
        resolve_source(name)
        overrides = check_kind_options(load_recipe(spec), {"kind": kind, "experts": experts})
        chosen = load_recipe(spec).options(overrides)
        bank = chosen["experts"] if dynconv.LAYERS[chosen["kind"]].has_experts else 1
        path = output or default_output(name, chosen["kind"], bank)
        if not dry_run:
            check_output(path, force, "--output")
        return name, kwargs, spec, path

    name, kwargs, spec, path = plan()
    with steps(not as_json) as progress:
        original = step(progress, f"building {name}", lambda: build_model(name, pretrained=pretrained, **kwargs).eval())
        if weights is not None:
            step(progress, f"loading {weights}", lambda: load_weights(original, weights))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConversionWarningCategory)  # shown below, with the switch to use
            result = step(
                progress,
                "converting",
                lambda: convert_model(
                    original,
                    spec,
                    kind=kind,
                    experts=experts,
                    include=include or None,
                    exclude=exclude or None,
                    seed=seed,
                    noise=noise,
                    input_size=input_size,
                    num_classes=num_classes,
                    share_routing=share_routing,
                ),
            )
        check = None
        if not no_verify:
            x = torch.randn(2, *result.input_shape, generator=torch.Generator().manual_seed(0))
            check = step(progress, "verifying", lambda: compare(result.reference, result.model, x))
        written, size = None, None
        if not dry_run and (check is None or check.within_tolerance):
            step(progress, f"writing {path}", lambda: save_checkpoint(result, path, overwrite=force))
            written, size = str(path), path.stat().st_size
    for note in result.warnings:
        hint = f" ({note.cli_hint})" if note.cli_hint else ""
        err.print(f"warning: {note.message}{hint}", style="yellow", markup=False, highlight=False, soft_wrap=True)
    if as_json:
        print(json.dumps(render.conversion_json(name, result, check, written, size, dry_run), indent=2))
    else:
        render.render_conversion(out, result, check, written, size, dry_run)
    if check is not None and not check.within_tolerance:
        raise tolerance_error(check, "the converted model", "nothing was written")
