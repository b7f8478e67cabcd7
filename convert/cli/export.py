"""``dynconv export``: a checkpoint to ONNX with a dynamic batch, checked in ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..checkpoint import load_checkpoint, read_metadata
from ..export import export_onnx
from . import render_files
from .common import BaseModelName, Debug, Json, UsageError, base_model, check_output, command, out, step, steps


@command("export")
def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a dynconv .safetensors checkpoint")],
    onnx: Annotated[Path, typer.Option("--onnx", help="the .onnx file to write")],
    fold_bn: Annotated[bool, typer.Option("--fold-bn", help="fold each BatchNorm that follows a conv into it")] = False,
    input_size: Annotated[int | None, typer.Option(help="image size (default: the recorded probe size)")] = None,
    batch_size: Annotated[
        int | None,
        typer.Option("--batch-size", help="export a graph for this batch only, fastest for it (default: dynamic)"),
    ] = None,
    batch: Annotated[
        list[int] | None,
        typer.Option("--batch", help="batch sizes to check a dynamic graph at in onnxruntime (default 1 and 3)"),
    ] = None,
    model: BaseModelName = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: torch.onnx's)")] = None,
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing output")] = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Export a checkpoint to ONNX (dynamic batch, or --batch-size N), checked with onnxruntime before it is written."""

    def plan() -> tuple[int, int, int]:
        if onnx.suffix != ".onnx":
            raise UsageError(f"--onnx {onnx} should end in .onnx")
        if batch is not None and min(batch) < 1:
            raise UsageError(f"--batch sizes must be positive, got {batch}")
        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size must be positive, got {batch_size}")
        if batch_size is not None and batch and set(batch) != {batch_size}:
            raise UsageError(f"a graph for --batch-size {batch_size} runs only at that batch; drop --batch {batch}")
        check_output(onnx, force, "--onnx")
        channels, height, width = read_metadata(checkpoint)["input_shape"]
        if input_size is not None:
            height = width = input_size
        return channels, height, width

    shape = plan()
    with steps(not as_json) as progress:
        base = base_model(model)
        loaded = step(progress, f"loading {checkpoint}", lambda: load_checkpoint(checkpoint, model=base))
        result = step(
            progress,
            f"exporting and checking {onnx}",
            lambda: export_onnx(
                loaded,
                onnx,
                batch=batch_size,
                input_shape=shape,
                fold_bn=fold_bn,
                check_batches=tuple(batch) if batch else None,
                overwrite=force,
                opset=opset,
            ),
        )
    if as_json:
        print(json.dumps(render_files.export_json(result), indent=2))
    else:
        render_files.render_export(out, result)
