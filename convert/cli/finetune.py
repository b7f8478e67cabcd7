"""``dynconv finetune``: train a converted checkpoint on an image folder, resumable, DDP under torchrun."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..checkpoint import read_training_state
from ..models import build_model
from . import render
from .common import Debug, UsageError, check_output, command, err, out


@command("finetune")
def finetune_cmd(
    checkpoint: Annotated[Path, typer.Argument(help="a converted .safetensors checkpoint")],
    data: Annotated[Path, typer.Argument(help="image folder: one subfolder per class (or train/ and val/)")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: CHECKPOINT-finetuned")] = None,
    epochs: Annotated[int, typer.Option(help="epochs in total (a resumed run continues to this)")] = 5,
    lr: Annotated[float, typer.Option(help="SGD learning rate")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="per process")] = 64,
    image_size: Annotated[int | None, typer.Option(help="default: the checkpoint's probe size")] = None,
    num_classes: Annotated[
        int | None,
        typer.Option("--num-classes", help="a new classifier head for DATA's N classes (if the model has another)"),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="base model of a checkpoint converted from custom code: package.module:factory"),
    ] = None,
    temperature_epochs: Annotated[float, typer.Option(help="anneal DyConv temperature 30 -> 1 over these")] = 10.0,
    router_warmup_epochs: Annotated[int, typer.Option(help="first epochs train the routers only")] = 0,
    router_lr_scale: Annotated[float, typer.Option(help="router learning rate = lr x this")] = 1.0,
    max_steps: Annotated[int | None, typer.Option(help="cap steps per epoch (smoke runs)")] = None,
    seed: Annotated[int, typer.Option(help="data split, shuffling and new head seed")] = 0,
    resume: Annotated[bool, typer.Option("--resume", help="continue OUTPUT's own run")] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite OUTPUT")] = False,
    debug: Debug = False,
) -> None:
    """Fine-tune a converted checkpoint on an image folder; resumable; run under torchrun for DDP."""
    from ..finetune import EpochLog, TrainConfig, finetune

    target = output or checkpoint.with_name(checkpoint.stem + "-finetuned.safetensors")
    if num_classes is not None and num_classes < 1:
        raise UsageError(f"--num-classes must be at least 1, got {num_classes}")
    if not resume:
        check_output(target, force, "--output", alternative=", or --resume to continue its run")
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
    base = build_model(model) if model else None
    saved = read_training_state(target) if resume and target.exists() else None
    epoch = [saved[0]["epoch"] if saved else 0]  # epochs done; the callbacks advance it
    rank = int(os.environ.get("RANK", "0"))
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps, eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[loss]}"),
        console=err,
        transient=True,
        disable=rank != 0,
        redirect_stdout=False,  # stdout may be a log file: its lines must not go to the terminal
        redirect_stderr=False,
    )
    same_screen = out.is_terminal and err.is_terminal  # then epoch lines go above the bar, not through it
    with bar:
        task = bar.add_task(f"epoch {epoch[0] + 1}/{epochs}", total=None, loss="")

        def on_step(step: int, steps: int, loss: float) -> None:
            if step == 1:
                bar.reset(task, total=steps, description=f"epoch {epoch[0] + 1}/{epochs}")
            bar.update(task, completed=step, loss=f"loss {loss:.3f}")

        def on_epoch(log: EpochLog) -> None:
            epoch[0] = log.epoch
            console = bar.console if same_screen else out
            console.print(render.epoch_line(log, epochs), highlight=False, markup=False, soft_wrap=True)

        state = finetune(
            checkpoint,
            data,
            target,
            config,
            resume=resume,
            overwrite=force,
            log=on_epoch,
            progress=on_step,
            num_classes=num_classes,
            model=base,
        )
    if rank == 0:
        out.print(f"wrote {target} (epoch {state.epoch})", soft_wrap=True, highlight=False, markup=False)
