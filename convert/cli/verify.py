"""``dynconv verify``: rebuild a checkpoint, run it, and optionally compare it with the original."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer

from ..checkpoint import load_checkpoint, read_metadata
from ..errors import WorkFailedError
from ..heads import copy_head, replace_head
from ..models import ModelSource
from ..verify import compare, output
from ..weights import load_weights
from . import render_files
from .common import BaseModelName, Debug, Json, UsageError, base_model, command, out, tolerance_error


@command("verify")
def verify_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a dynconv .safetensors checkpoint")],
    weights: Annotated[Path | None, typer.Option(help="original weights: also compare with the original model")] = None,
    model: BaseModelName = None,
    input_size: Annotated[int | None, typer.Option(help="image size (default: the recorded probe size)")] = None,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Rebuild a checkpoint, check its digest, run it; with --weights, compare it to the original."""
    if weights is not None and not weights.is_file():
        raise UsageError(f"weights file {weights} does not exist")
    meta = read_metadata(checkpoint)
    base = base_model(model)
    loaded = load_checkpoint(checkpoint, model=base)
    channels, height, width = meta["input_shape"]
    if input_size is not None:
        height = width = input_size
    x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    y = output(loaded, x)
    check = None
    if weights is not None:
        original = base if base is not None else ModelSource.from_dict(meta["base"]).build()
        load_weights(original, weights)
        if meta.get("head"):  # a new head is not the original's: both get the checkpoint's, the features are compared
            replace_head(original, int(meta["head"]["num_classes"]))
            copy_head(original, loaded, meta["head"]["layers"])
        check = compare(original.eval(), loaded, x)
    report = render_files.verification_json(checkpoint, y, check)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        render_files.render_verification(out, checkpoint, meta, (height, width), y, check)
    if not report["finite"]:
        raise WorkFailedError("the rebuilt model produces non-finite outputs")
    if check is not None and not check.within_tolerance:
        raise tolerance_error(check, "the checkpoint", "expected after fine-tuning, not right after conversion")
