"""``dynconv analyze``: what the routers of a converted (or fine-tuned) checkpoint learned, over an image folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..analyze import UNIFORM, Analysis, LayerStats, analyze
from .common import Debug, Json, UsageError, command, err, out
from .fit import Col, fitted_table

ROUTING_JSON = "routing.json"


def _check_output(folder: Path, force: bool) -> None:
    """Refuse an output that is a file, whose parent is missing, or that already holds an analysis (without --force)."""
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output {folder} is a file; give a folder with --output")
    if not folder.exists() and not folder.parent.is_dir():
        raise UsageError(f"the folder {folder.parent} for output {folder} does not exist; create it first")
    if (folder / ROUTING_JSON).exists() and not force:
        raise UsageError(f"output {folder} already holds an analysis ({ROUTING_JSON}); pass --force to overwrite it")


def _weights(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


#: The columns of the analysis table, and the order in which a narrow terminal drops them.
COLUMNS = [
    Col("layer", whole=True),
    Col("K", "right"),
    Col("entropy", "right"),
    Col("margin", "right"),
    Col("varies", "right"),
    Col("top expert", "right"),
    Col("mean weights"),
    Col("spread", "right"),
    Col("class ratio", "right"),
    Col("verdict", whole=True),
]
DROP = ("mean weights", "class ratio", "K", "spread", "top expert", "varies", "margin", "entropy")


def _top_expert(stats: LayerStats) -> str:
    """The expert that wins most decisions and how often, or ``none (uniform)`` when no expert stands out."""
    if stats.verdict == UNIFORM:
        return "none (uniform)"
    top = max(range(stats.experts), key=lambda k: stats.top_share[k])
    return f"e{top} {100 * stats.top_share[top]:.0f}%"


def analysis_rows(analysis: Analysis) -> list[list[str]]:
    """One row of :data:`COLUMNS` per layer."""
    rows = []
    for stats in analysis.layers:
        moved = stats.moved
        spread = "—" if stats.spread is None else f"{stats.spread:.3f}" + (f" ({moved:.1f}×)" if moved else "")
        ratio = "—" if stats.class_ratio is None else f"{stats.class_ratio:.3g}"
        name = stats.name + (" (shared)" if stats.routing_block else "") + (" (per channel)" * stats.per_channel)
        rows.append(
            [
                name,
                str(stats.experts),
                f"{stats.entropy:.3f}",
                f"{stats.margin:.3f}",
                f"{stats.variation:.3f}",
                _top_expert(stats),
                _weights(stats.mean_routing),
                spread,
                ratio,
                stats.verdict,
            ]
        )
    return rows


def render_analysis(console: Console, analysis: Analysis, written: list[Path]) -> None:
    """The per-layer table (fitted to the terminal: names stay whole), a legend, the summary and the files."""
    title = f"Routing over {analysis.images} images of {analysis.data}"
    rows = analysis_rows(analysis)
    console.print(fitted_table(console, COLUMNS, rows, drop=DROP, title=title, title_justify="left"))
    console.print(
        "entropy: 1 = uniform over the experts; margin: how far the top expert stands above uniform "
        "(0 = uniform, 1 = one expert); varies: how much the routing changes from image to image (in units of "
        "the uniform weight 1/K); top expert: share of decisions it wins; mean weights: per expert; spread: "
        "relative distance of the experts (× its value at conversion); class ratio: between/within class variance "
        "of the routing",
        style="dim",
        highlight=False,
    )
    console.print(analysis.summary(), highlight=False, soft_wrap=True)
    for path in written:
        console.print(f"wrote {path}", highlight=False, markup=False, soft_wrap=True)


@command("analyze")
def analyze_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a converted (or fine-tuned) .safetensors checkpoint")],
    data: Annotated[Path, typer.Argument(help="image folder: one subfolder per class (or train/ and val/: val)")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help=f"folder for {ROUTING_JSON} and PNG figures")
    ] = None,
    layer: Annotated[
        list[str] | None, typer.Option("--layer", help="analyse only these layers (name, glob or re:regex)")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="images per forward")] = 64,
    limit: Annotated[int | None, typer.Option(help="analyse at most N images (a seeded random choice)")] = None,
    image_size: Annotated[int | None, typer.Option(help="default: the checkpoint's probe size")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an analysis already in OUTPUT")] = False,
    as_json: Json = False,
    debug: Debug = False,
) -> None:
    """Routing statistics of a converted checkpoint over an image folder: per layer and per class."""
    if output is not None:
        _check_output(output, force)
        from ..figures import require_matplotlib

        require_matplotlib()  # before the work, not after it
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be at least 1, got {limit}")
    progress = Progress(
        TextColumn("analysing"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("images"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=as_json,
    )
    with progress:
        task = progress.add_task("analysing", total=None)

        def on_batch(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        options = {"batch_size": batch_size, "limit": limit, "image_size": image_size}
        analysis = analyze(checkpoint, data, layers=layer or None, progress=on_batch, **options)
    written: list[Path] = []
    if output is not None:
        from ..figures import write_figures

        output.mkdir(exist_ok=True)
        written.append(analysis.write_json(output / ROUTING_JSON))
        chosen = analysis.layers if layer and len(analysis.layers) <= 8 else None  # else a pick over the depth
        written += write_figures(analysis, output, heatmap=chosen)
    if as_json:
        print(json.dumps({**analysis.to_json(), "written": [str(p) for p in written]}, indent=2))
    else:
        render_analysis(out, analysis, written)
