"""The ``dynconv`` command line: convert, inspect, verify, export, finetune, models, recipes.

Exit codes: 0 success, 1 the work failed (verification fell short), 2 bad input.
Every error is one sentence on stderr (a traceback only with ``--debug``), and no
command leaves a partial output file.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import typer
from rich.table import Table

import dynconv

from . import catalog, report
from .checkpoint import load_checkpoint, read_metadata, save_checkpoint, tensor_shapes
from .cli_common import T, UsageError, check_output, err, fail, fail_tolerance, guarded, out, steps
from .cli_export import export_cmd
from .converter import convert_model
from .models import BaseModel, build_model, list_models, resolve_source
from .recipe import Recipe
from .verify import compare
from .weights import load_weights

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Turn the convs of a trained model into dynamic convolutions that start out computing the same function.",
)
app.command("export")(export_cmd)


def default_output(model: str, kind: str, experts: int) -> Path:
    """``MODEL-KIND-KE.safetensors``, e.g. ``resnet18-condconv-4e.safetensors``."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", model.rsplit(":", 1)[-1].rsplit(".", 1)[-1])
    return Path(f"{stem}-{kind}-{experts}e.safetensors")


def _load_recipe(recipe: str | None) -> Recipe | None:
    return None if recipe is None else Recipe.from_yaml(catalog.find_recipe(recipe))


@app.command("convert")
def convert_cmd(
    model: Annotated[
        str | None,
        typer.Argument(
            help="torchvision or timm name, or package.module:factory (optional when the recipe names a model)"
        ),
    ] = None,
    experts: Annotated[int | None, typer.Option("--experts", "-k", help="experts per layer (default 4)")] = None,
    kind: Annotated[str | None, typer.Option(help="condconv | dyconv | dynet (default condconv)")] = None,
    recipe: Annotated[str | None, typer.Option(help="YAML recipe file, or a shipped recipe name")] = None,
    include: Annotated[list[str] | None, typer.Option(help="convert only convs matching (glob or re:regex)")] = None,
    exclude: Annotated[list[str] | None, typer.Option(help="leave convs matching alone")] = None,
    weights: Annotated[Path | None, typer.Option(help="original weights (.safetensors, .pth, .pt)")] = None,
    pretrained: Annotated[bool, typer.Option(help="download the zoo's pretrained weights")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="checkpoint to write")] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing output")] = False,
    seed: Annotated[int | None, typer.Option(help="seed for the experts' noise (default 0)")] = None,
    noise: Annotated[float | None, typer.Option(help="relative noise between experts (default 0.01)")] = None,
    input_size: Annotated[int | None, typer.Option(help="probe/verification image size (default: the model's)")] = None,
    dry_run: Annotated[bool, typer.Option(help="show the plan, write nothing")] = False,
    no_verify: Annotated[bool, typer.Option(help="skip comparing converted and original outputs")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print a machine-readable result")] = False,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Convert MODEL's convs to dynamic convs from its weights, verify, and write a checkpoint."""

    def plan() -> tuple[str, dict[str, Any], Recipe | None, Path]:
        if weights is not None and pretrained:
            raise UsageError("choose one of --weights FILE and --pretrained")
        if experts is not None and experts < 1:
            raise UsageError(f"--experts must be at least 1, got {experts}")
        if kind is not None and kind not in dynconv.LAYERS:
            raise UsageError(f"unknown kind {kind!r}; choose one of {', '.join(dynconv.LAYERS)}")
        if weights is not None and not weights.is_file():
            raise UsageError(f"weights file {weights} does not exist")
        spec = _load_recipe(recipe)
        name, kwargs = model, {}
        if spec is not None and spec.model is not None and (name is None or name == spec.model.name):
            name, kwargs = spec.model.name, dict(spec.model.kwargs)
        if name is None:
            raise UsageError("name a MODEL (e.g. resnet18), or a --recipe that names one")
        resolve_source(name)
        defaults = spec.defaults if spec is not None else None
        final_kind = kind or (defaults.kind if defaults and defaults.kind else "condconv")
        final_experts = experts or (defaults.experts if defaults and defaults.experts else 4)
        path = output or default_output(name, final_kind, final_experts)
        if not dry_run:
            check_output(path, force, "--output")
        return name, kwargs, spec, path

    name, kwargs, spec, path = guarded(debug, plan)
    with steps(not as_json) as progress:

        def step(text: str, fn: Callable[[], T]) -> T:
            task = progress.add_task(text)
            value = guarded(debug, fn)
            progress.remove_task(task)
            return value

        original = step(f"building {name}", lambda: build_model(name, pretrained=pretrained, **kwargs).eval())
        if weights is not None:
            step(f"loading {weights}", lambda: load_weights(original, weights))
        result = step(
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
            ),
        )
        check = None
        if not no_verify:
            shape = result.input_shape
            x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
            check = step("verifying", lambda: compare(original, result.model, x))
        written, size = None, None
        if not dry_run and (check is None or check.within_tolerance):
            step(f"writing {path}", lambda: save_checkpoint(result, path, overwrite=force))
            written, size = str(path), path.stat().st_size
    if as_json:
        print(json.dumps(report.conversion_json(name, result, check, written, size, dry_run), indent=2))
    else:
        report.render_conversion(out, result, check, written, size, dry_run)
    if check is not None and not check.within_tolerance:
        fail_tolerance(check, "the converted model", "nothing was written")


@app.command("inspect")
def inspect_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a dynconv .safetensors checkpoint")],
    as_json: Annotated[bool, typer.Option("--json", help="print a machine-readable result")] = False,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Show what is in a checkpoint: base model, versions, converted layers, sizes."""
    meta = guarded(debug, lambda: read_metadata(checkpoint))
    shapes = guarded(debug, lambda: tensor_shapes(checkpoint))
    size = checkpoint.stat().st_size
    if as_json:
        layers = report.checkpoint_layers(meta, shapes)
        print(
            json.dumps(
                {**meta, "path": str(checkpoint), "file_size": size, "tensors": len(shapes), "layers": layers}, indent=2
            )
        )
    else:
        report.render_checkpoint(out, str(checkpoint), meta, shapes, size)


@app.command("verify")
def verify_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a dynconv .safetensors checkpoint")],
    weights: Annotated[Path | None, typer.Option(help="original weights: also compare with the original model")] = None,
    model: Annotated[str | None, typer.Option(help="package.module:factory for a custom base model")] = None,
    input_size: Annotated[int | None, typer.Option(help="image size (default: the recorded probe size)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print a machine-readable result")] = False,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Rebuild a checkpoint, check its digest, run it; with --weights, compare it to the original."""
    if weights is not None and not weights.is_file():
        fail(f"weights file {weights} does not exist")
    meta = guarded(debug, lambda: read_metadata(checkpoint))
    base = guarded(debug, lambda: build_model(model) if model else None)
    loaded = guarded(debug, lambda: load_checkpoint(checkpoint, model=base))
    channels, height, width = meta["input_shape"]
    if input_size is not None:
        height = width = input_size
    x = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = loaded(x)
    y = y if isinstance(y, torch.Tensor) else y[0]
    finite = bool(torch.isfinite(y).all())
    result: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "digest": "ok",
        "loads": True,
        "output_shape": list(y.shape),
        "finite": finite,
        "comparison": None,
    }
    check = None
    if weights is not None:
        original = guarded(debug, lambda: base if base is not None else BaseModel.from_dict(meta["base"]).build())
        guarded(debug, lambda: load_weights(original, weights))
        check = compare(original.eval(), loaded, x)
        result["comparison"] = {**check.__dict__, "ok": check.ok}
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        table = Table(show_header=False, title=f"verify {checkpoint}", title_justify="left")
        table.add_column("check")
        table.add_column("result")
        table.add_row("digest", "ok")
        table.add_row(
            "rebuilt and loaded",
            f"{meta['base']['source']}:{meta['base']['name']}, {len(meta['layers'])} dynamic layers",
        )
        verdict = "finite" if finite else "NOT FINITE"
        table.add_row(f"forward at {height}x{width}", f"output {tuple(y.shape)}, {verdict}")
        if check is not None:
            table.add_row(
                "vs original weights",
                f"max difference {check.max_rel:.2e} relative — "
                f"{'ok' if check.within_tolerance else 'OUT OF TOLERANCE'}",
            )
        out.print(table)
    if not finite:
        fail("the rebuilt model produces non-finite outputs", code=1)
    if check is not None and not check.within_tolerance:
        fail_tolerance(check, "the checkpoint", "expected after fine-tuning, not right after conversion")


@app.command("finetune")
def finetune_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a converted .safetensors checkpoint")],
    data: Annotated[Path, typer.Argument(help="image folder: one subfolder per class (or train/ and val/)")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: CHECKPOINT-finetuned")] = None,
    epochs: Annotated[int, typer.Option(help="epochs in total (a resumed run continues to this)")] = 5,
    lr: Annotated[float, typer.Option(help="SGD learning rate")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="per process")] = 64,
    image_size: Annotated[int | None, typer.Option(help="default: the checkpoint's probe size")] = None,
    temperature_epochs: Annotated[float, typer.Option(help="anneal DyConv temperature 30 -> 1 over these")] = 10.0,
    router_warmup_epochs: Annotated[int, typer.Option(help="first epochs train the routers only")] = 0,
    router_lr_scale: Annotated[float, typer.Option(help="router learning rate = lr x this")] = 1.0,
    max_steps: Annotated[int | None, typer.Option(help="cap steps per epoch (smoke runs)")] = None,
    seed: Annotated[int, typer.Option(help="data split and shuffling seed")] = 0,
    resume: Annotated[bool, typer.Option(help="continue OUTPUT's own run")] = False,
    force: Annotated[bool, typer.Option(help="overwrite OUTPUT")] = False,
    debug: Annotated[bool, typer.Option(help="show tracebacks")] = False,
) -> None:
    """Fine-tune a converted checkpoint on an image folder; resumable; run under torchrun for DDP."""
    from .finetune import TrainConfig, finetune

    target = output or checkpoint.with_name(checkpoint.stem + "-finetuned.safetensors")
    config = TrainConfig(
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        image_size=image_size,
        temperature_epochs=temperature_epochs,
        router_warmup_epochs=router_warmup_epochs,
        router_lr_scale=router_lr_scale,
        max_steps_per_epoch=max_steps,
        seed=seed,
    )
    rank = int(os.environ.get("RANK", "0"))
    table = Table(
        "epoch",
        "train loss",
        "train acc",
        "val loss",
        "val acc",
        "temperature",
        "s",
        title=f"fine-tuning {checkpoint} on {data}",
        title_justify="left",
    )
    with steps(rank == 0) as bar:
        task = bar.add_task("training")

        def on_step(step: int, steps: int, loss: float) -> None:
            bar.update(task, description=f"step {step}/{steps}  loss {loss:.3f}")

        def on_epoch(log) -> None:
            temp = "—" if log.temperature is None else f"{log.temperature:.1f}"
            row = (
                str(log.epoch),
                f"{log.train_loss:.4f}",
                f"{log.train_acc:.3f}",
                f"{log.val_loss:.4f}",
                f"{log.val_acc:.3f}",
                temp,
                f"{log.seconds:.1f}",
            )
            table.add_row(*row)
            err.print(
                f"epoch {row[0]}: train loss {row[1]} acc {row[2]}, val loss {row[3]} acc {row[4]}, "
                f"temperature {row[5]} ({row[6]} s)",
                highlight=False,
            )

        state = guarded(
            debug,
            lambda: finetune(
                checkpoint, data, target, config, resume=resume, overwrite=force, log=on_epoch, progress=on_step
            ),
        )
    if rank == 0:
        out.print(table)
        out.print(f"wrote {target} (epoch {state.epoch})", soft_wrap=True, highlight=False, markup=False)


@app.command("models")
def models_cmd(
    pattern: Annotated[str | None, typer.Argument(help="glob on model names, e.g. 'resnet*'")] = None,
    source: Annotated[str | None, typer.Option(help="torchvision or timm only")] = None,
) -> None:
    """List the model names `convert` can build, marked by source."""
    found = [(s, n) for s, n in list_models(pattern) if source is None or s == source]
    if not found:
        fail(f"no model name matches {pattern!r}; try a broader pattern such as '{(pattern or '')[:3]}*'")
    for src, name in found:
        out.print(f"{src:12} {name}", markup=False, highlight=False)


@app.command("recipes")
def recipes_cmd() -> None:
    """List the shipped recipes with one-line descriptions."""
    table = Table("recipe", "model", "description")
    for name, path in catalog.shipped_recipes().items():
        spec = Recipe.from_yaml(path)
        table.add_row(name, spec.model.name if spec.model else "any", spec.description)
    out.print(table)


@app.command("kinds")
def kinds_cmd() -> None:
    """List the dynamic convolution kinds and their routing."""
    table = Table("kind", "layer", "routing")
    for name, cls in dynconv.LAYERS.items():
        table.add_row(name, f"dynconv.{cls.__name__}", (cls.__doc__ or "").strip().splitlines()[0])
    out.print(table)


@app.command("version")
def version_cmd() -> None:
    """Print the dynconv and torch versions."""
    out.print(f"dynconv {dynconv.__version__} (torch {torch.__version__})", highlight=False)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted", style="red")
        sys.exit(130)


if __name__ == "__main__":  # python -m convert.cli (e.g. under torchrun)
    main()
