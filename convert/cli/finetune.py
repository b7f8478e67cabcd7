"""``dynconv finetune``: train a converted checkpoint on an image folder, resumable, DDP under torchrun."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from . import render
from .common import Debug, check_output, command, err, out, steps


@command("finetune")
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
    debug: Debug = False,
) -> None:
    """Fine-tune a converted checkpoint on an image folder; resumable; run under torchrun for DDP."""
    from ..finetune import EpochLog, TrainConfig, finetune

    target = output or checkpoint.with_name(checkpoint.stem + "-finetuned.safetensors")
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
    rank = int(os.environ.get("RANK", "0"))
    table = render.epoch_table(f"fine-tuning {checkpoint} on {data}")
    with steps(rank == 0) as bar:
        task = bar.add_task("training")

        def on_step(step: int, steps: int, loss: float) -> None:
            bar.update(task, description=f"step {step}/{steps}  loss {loss:.3f}")

        def on_epoch(log: EpochLog) -> None:
            row = render.epoch_row(log)
            table.add_row(*row)
            err.print(render.epoch_line(row), highlight=False)

        state = finetune(
            checkpoint, data, target, config, resume=resume, overwrite=force, log=on_epoch, progress=on_step
        )
    if rank == 0:
        out.print(table)
        out.print(f"wrote {target} (epoch {state.epoch})", soft_wrap=True, highlight=False, markup=False)
