"""``dynconv inspect``: what is in a checkpoint, read from its header without loading the tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..checkpoint import read_metadata, tensor_shapes
from . import render_files
from .common import Debug, Json, command, out


@command("inspect")
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a dynconv .safetensors checkpoint")],
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Show what is in a checkpoint: base model, versions, converted layers, sizes."""
    meta = read_metadata(checkpoint)
    shapes = tensor_shapes(checkpoint)
    size = checkpoint.stat().st_size
    if as_json:
        print(json.dumps(render_files.checkpoint_json(str(checkpoint), meta, shapes, size), indent=2))
    else:
        render_files.render_checkpoint(out, str(checkpoint), meta, shapes, size)
