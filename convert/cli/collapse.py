"""``dynconv collapse``: turn dynamic layers whose routing barely varies back into static convs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader

from ..checkpoint import load_checkpoint, save_checkpoint
from ..collapse import METRICS, CollapseResult, collapse
from .common import BaseModelName, Debug, Json, UsageError, base_model, check_output, command, out, steps


def _value(value: float | None, digits: str = ".3g") -> str:
    return "—" if value is None else format(value, digits)


def plan_table(result: CollapseResult) -> Table:
    """One row per dynamic layer: routing spread, the change its collapse causes, the time it saves, the decision."""
    unit = "accuracy points" if result.metric == "accuracy" else "% output"
    table = Table(title=f"Collapse plan over {result.images} images ({unit})", title_justify="left")
    for column, justify in [("layer", "left"), ("kind", "left"), ("routing spread", "right")]:
        table.add_column(column, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for column in ("alone", "cumulative", "saves (ms, batch 1)"):
        table.add_column(column, justify="right")
    table.add_column("decision", overflow="fold")
    for plan in result.layers:
        decision = "collapsed" if plan.collapsed else f"kept: {plan.reason}"
        row = [plan.name, plan.kind, f"{plan.spread:.3g}", _value(plan.error), _value(plan.cumulative)]
        table.add_row(*row, _value(plan.saved_ms, ".3f"), decision)
    return table


def render_collapse(console: Console, result: CollapseResult, output: Path) -> None:
    console.print(plan_table(result))
    console.print(
        "routing spread: RMS distance of a sample's routing from the mean routing, relative to it; alone: the change "
        "collapsing only this layer causes; cumulative: with every layer collapsed before it",
        style="dim",
        highlight=False,
    )
    console.print(result.summary(), highlight=False, soft_wrap=True)
    console.print(f"wrote {output}", highlight=False, markup=False, soft_wrap=True)


@command("collapse")
def collapse_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a converted (usually fine-tuned) .safetensors checkpoint")],
    data: Annotated[
        Path | None,
        typer.Argument(help="image folder, one subfolder per class (or train/ and val/: val); default: random inputs"),
    ] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="the collapsed checkpoint to write")] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(help="budget: accuracy points on DATA (or % relative output change with --metric output)"),
    ] = None,
    keep: Annotated[
        int | None, typer.Option(help="keep the N layers whose routing varies most, collapse the rest")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="accuracy (default with DATA) or output")] = None,
    limit: Annotated[int, typer.Option(help="use at most N images of DATA (a seeded random choice)")] = 512,
    samples: Annotated[int, typer.Option(help="random inputs to route without DATA")] = 64,
    batch_size: Annotated[int, typer.Option(help="images per forward")] = 64,
    image_size: Annotated[int | None, typer.Option(help="default: the checkpoint's probe size")] = None,
    model: BaseModelName = None,
    timing: Annotated[bool, typer.Option("--timing/--no-timing", help="time each layer at batch 1")] = True,
    force: Annotated[bool, typer.Option("--force", help="overwrite OUTPUT")] = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Collapse layers whose routing barely varies into static convs, within an accuracy (or output) budget."""
    from ..analyze import analysis_dataset
    from ..finetune import dynconv_input_size

    if output is None:
        raise UsageError("give the collapsed checkpoint's path with --output")
    if max_drop is not None and keep is not None:
        raise UsageError("give either --max-drop or --keep, not both")
    if metric is not None and metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if data is None and keep is None and metric != "output":
        raise UsageError(
            "the accuracy budget (--max-drop) needs DATA, an image folder with one subfolder per class; "
            "give DATA, or --metric output, or --keep N"
        )
    if data is not None and not data.is_dir():
        raise UsageError(f"image folder {data} does not exist")
    for name, value in (("--limit", limit), ("--samples", samples), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    check_output(output, force, "--output")
    with steps(not as_json) as progress:
        task = progress.add_task("loading the checkpoint")
        net = load_checkpoint(checkpoint, model=base_model(model))
        size = image_size or int(dynconv_input_size(net))
        if data is not None:
            dataset, _ = analysis_dataset(data, size, limit)
            loader = DataLoader(dataset, batch_size=batch_size)
        else:
            noise = torch.randn(samples, 3, size, size, generator=torch.Generator().manual_seed(0))
            loader = list(noise.split(batch_size))
        result = collapse(
            net,
            loader,
            max_drop=max_drop,
            keep=keep,
            metric=metric,
            time_layers=timing,
            progress=lambda text: progress.update(task, description=text),
        )
        progress.update(task, description=f"writing {output}")
        save_checkpoint(result.model, output, overwrite=force)
    if as_json:
        print(json.dumps({**result.to_json(), "output": str(output)}, indent=2))
    else:
        render_collapse(out, result, output)
