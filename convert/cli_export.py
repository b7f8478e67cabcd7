"""``dynconv export``: a checkpoint to ONNX with a dynamic batch, checked in ONNX Runtime."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from .checkpoint import load_checkpoint, read_metadata
from .cli_common import UsageError, check_output, guarded, out, steps
from .export import CHECK_BATCHES, ExportResult, export_onnx
from .models import build_model


def _result_json(result: ExportResult) -> dict:
    folded = result.folded
    return {
        "path": str(result.path),
        "file_size": result.path.stat().st_size,
        "input_shape": ["batch", *result.input_shape],
        "opset": result.opset,
        "checks": [c.__dict__ for c in result.checks],
        "folded_batchnorm": None if folded is None else [p.__dict__ for p in folded.folded],
        "unfolded_batchnorm": None if folded is None else [s.__dict__ for s in folded.skipped],
        "seconds": round(result.seconds, 1),
    }


def _render(result: ExportResult) -> None:
    table = Table(show_header=False, title=f"export {result.path}", title_justify="left")
    table.add_column("item")
    table.add_column("value")
    table.add_row("input", escape(f"[batch, {', '.join(map(str, result.input_shape))}] float32"))
    table.add_row("file", f"{result.path.stat().st_size / 2**20:.1f} MiB, opset {result.opset}")
    if result.folded is not None:
        kept = f", {len(result.folded.skipped)} left in place" if result.folded.skipped else ""
        table.add_row("BatchNorm folded", f"{len(result.folded.folded)}{kept}")
    for check in result.checks:
        verdict = "ok" if check.ok else "OUT OF TOLERANCE"
        table.add_row(
            f"onnxruntime, batch {check.batch}",
            f"max difference {check.max_abs:.2e} ({check.max_rel:.2e} relative) — {verdict}",
        )
    out.print(table)


def export_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a dynconv .safetensors checkpoint")],
    onnx: Annotated[Path, typer.Option("--onnx", help="the .onnx file to write")],
    fold_bn: Annotated[bool, typer.Option("--fold-bn", help="fold each BatchNorm that follows a conv into it")] = False,
    input_size: Annotated[int | None, typer.Option(help="image size (default: the recorded probe size)")] = None,
    batch: Annotated[
        list[int] | None, typer.Option("--batch", help="batch sizes to check in onnxruntime (default 1 and 3)")
    ] = None,
    model: Annotated[str | None, typer.Option(help="package.module:factory for a custom base model")] = None,
    opset: Annotated[int | None, typer.Option(help="ONNX opset (default: torch.onnx's)")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing output")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a machine-readable result")] = False,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Export a checkpoint to ONNX with a dynamic batch axis, checked with onnxruntime before it is written."""

    def plan() -> tuple[int, int, int]:
        if onnx.suffix != ".onnx":
            raise UsageError(f"--onnx {onnx} should end in .onnx")
        if batch is not None and min(batch) < 1:
            raise UsageError(f"--batch sizes must be positive, got {batch}")
        check_output(onnx, force, "--onnx")
        channels, height, width = read_metadata(checkpoint)["input_shape"]
        if input_size is not None:
            height = width = input_size
        return channels, height, width

    shape = guarded(debug, plan)
    with steps(not as_json) as progress:
        task = progress.add_task(f"loading {checkpoint}")
        base = guarded(debug, lambda: build_model(model) if model else None)
        loaded = guarded(debug, lambda: load_checkpoint(checkpoint, model=base))
        progress.update(task, description=f"exporting and checking {onnx}")
        result = guarded(
            debug,
            lambda: export_onnx(
                loaded,
                onnx,
                input_shape=shape,
                fold_bn=fold_bn,
                check_batches=tuple(batch or CHECK_BATCHES),
                overwrite=force,
                opset=opset,
            ),
        )
    if as_json:
        print(json.dumps(_result_json(result), indent=2))
    else:
        _render(result)
