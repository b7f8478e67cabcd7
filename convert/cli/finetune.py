"""``dynconv finetune``: train a converted checkpoint on an image folder with timm's training stack.

Every option's default and help come from :class:`convert.finetune.TrainConfig`. The run
prints a header first (data, size, steps, kinds and their temperature schedule), a
progress bar on a terminal or a progress line every ``--log-every`` seconds otherwise,
one line per epoch; Ctrl-C says what was saved and how to resume.
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from ..finetune.config import TrainConfig, default, help_text
from . import render
from .common import BaseModelName, Debug, UsageError, base_model, check_output, command, err, out


def _o(name: str, *flags: str) -> Any:
    """A typer option whose default and help are ``TrainConfig``'s."""
    return typer.Option(*flags, help=help_text(name))


@command("finetune")
def finetune_cmd(
    ctx: typer.Context,
    checkpoint: Annotated[Path, typer.Argument(help="a converted .safetensors checkpoint")],
    data: Annotated[Path, typer.Argument(help="image folder: one subfolder per class (or train/ and val/)")],
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: CHECKPOINT-finetuned")] = None,
    epochs: Annotated[int, _o("epochs")] = default("epochs"),
    batch_size: Annotated[int, _o("batch_size")] = default("batch_size"),
    image_size: Annotated[int | None, _o("image_size")] = default("image_size"),
    opt: Annotated[str, _o("opt")] = default("opt"),
    lr: Annotated[float, _o("lr")] = default("lr"),
    momentum: Annotated[float, _o("momentum")] = default("momentum"),
    weight_decay: Annotated[float, _o("weight_decay")] = default("weight_decay"),
    sched: Annotated[str, _o("sched")] = default("sched"),
    warmup_epochs: Annotated[float, _o("warmup_epochs")] = default("warmup_epochs"),
    warmup_lr: Annotated[float, _o("warmup_lr")] = default("warmup_lr"),
    min_lr: Annotated[float, _o("min_lr")] = default("min_lr"),
    decay_epochs: Annotated[float, _o("decay_epochs")] = default("decay_epochs"),
    smoothing: Annotated[float, _o("smoothing")] = default("smoothing"),
    mixup: Annotated[float, _o("mixup")] = default("mixup"),
    cutmix: Annotated[float, _o("cutmix")] = default("cutmix"),
    augment: Annotated[bool, _o("augment", "--augment/--no-augment")] = default("augment"),
    crop_min: Annotated[float, _o("crop_min")] = default("crop_min"),
    aa: Annotated[str | None, _o("aa")] = default("aa"),
    reprob: Annotated[float, _o("reprob")] = default("reprob"),
    clip_grad: Annotated[float | None, _o("clip_grad")] = default("clip_grad"),
    amp: Annotated[str, _o("amp")] = default("amp"),
    channels_last: Annotated[bool, _o("channels_last", "--channels-last")] = default("channels_last"),
    model_ema: Annotated[bool, _o("model_ema", "--model-ema")] = default("model_ema"),
    model_ema_decay: Annotated[float, _o("model_ema_decay")] = default("model_ema_decay"),
    temperature_epochs: Annotated[float, _o("temperature_epochs")] = default("temperature_epochs"),
    calibrate_routing: Annotated[int | None, _o("calibrate_routing")] = default("calibrate_routing"),
    router_warmup_epochs: Annotated[int, _o("router_warmup_epochs")] = default("router_warmup_epochs"),
    router_lr_scale: Annotated[float | None, _o("router_lr_scale")] = default("router_lr_scale"),
    max_steps: Annotated[int | None, _o("max_steps_per_epoch", "--max-steps")] = default("max_steps_per_epoch"),
    save_every_steps: Annotated[int, _o("save_every_steps")] = default("save_every_steps"),
    seed: Annotated[int, _o("seed")] = default("seed"),
    workers: Annotated[int, _o("workers")] = default("workers"),
    num_classes: Annotated[
        int | None,
        typer.Option("--num-classes", help="a new classifier head for DATA's N classes (if the model has another)"),
    ] = None,
    model: BaseModelName = None,
    log_every: Annotated[float, typer.Option(help="seconds between progress lines when not on a terminal")] = 30.0,
    resume: Annotated[
        bool, typer.Option("--resume", help="continue OUTPUT's own run from its last save point")
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="overwrite OUTPUT (and its training state)")] = False,
    debug: Debug = False,
) -> None:
    """Fine-tune a converted checkpoint on an image folder (timm's optimizers, schedules, augmentation,
    AMP, EMA); resumable after any interruption; run under torchrun for DDP.

    Router temperature: only kinds that declare an annealing anneal it over --temperature-epochs
    (DyConv: 30 -> 1); the others (ODConv, DCD, CondConv, DyNet) keep the temperature they were converted with.
    With --calibrate-routing N the fresh routers are set from N training batches first (input-dependent
    routing, the same function) and nothing anneals; by default a model whose dynamic layers are all
    CondConv is calibrated on 4 batches, any other starts from uniform routing.
    """
    from ..finetune import Reporter, finetune

    target = output or checkpoint.with_name(checkpoint.stem + "-finetuned.safetensors")
    if num_classes is not None and num_classes < 1:
        raise UsageError(f"--num-classes must be at least 1, got {num_classes}")
    if not resume:
        check_output(target, force, "--output", alternative=", or --resume to continue its run")
    config = TrainConfig(
        epochs=epochs,
        batch_size=batch_size,
        image_size=image_size,
        opt=opt,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        sched=sched,
        warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
        decay_epochs=decay_epochs,
        smoothing=smoothing,
        mixup=mixup,
        cutmix=cutmix,
        augment=augment,
        crop_min=crop_min,
        aa=aa,
        reprob=reprob,
        clip_grad=clip_grad,
        amp=amp,
        channels_last=channels_last,
        model_ema=model_ema,
        model_ema_decay=model_ema_decay,
        temperature_epochs=temperature_epochs,
        calibrate_routing=calibrate_routing,
        router_warmup_epochs=router_warmup_epochs,
        router_lr_scale=router_lr_scale,
        max_steps_per_epoch=max_steps,
        save_every_steps=save_every_steps,
        seed=seed,
        workers=workers,
    )
    resume_command = _resume_command(ctx, checkpoint, data, target)
    base = base_model(model)
    rank = int(os.environ.get("RANK", "0"))
    show = _Display(epochs, log_every, rank)
    saved: list[tuple[Path, int, int]] = []  # the last save point: sidecar, epochs done, steps into the next
    reporter = Reporter(show.header, show.step, show.epoch, lambda path, epoch, step: saved.append((path, epoch, step)))
    started = time.time()
    with show.bar:
        try:
            state = finetune(
                checkpoint,
                data,
                target,
                config,
                resume=resume,
                overwrite=force,
                reporter=reporter,
                num_classes=num_classes,
                model=base,
            )
        except KeyboardInterrupt:
            show.bar.stop()
            saved += _written_since(target, started)  # Ctrl-C may land between a save and its report
            err.print(_interrupted(target, saved, resume_command), markup=False, highlight=False, soft_wrap=True)
            raise SystemExit(130) from None  # the shell's code for SIGINT
    if rank == 0:
        weights = "EMA" if state.history and state.history[-1].get("weights") == "ema" else "raw"
        out.print(
            f"wrote {target} (epoch {state.epoch}): {weights} weights; training state in {saved[-1][0].name}"
            if saved
            else f"wrote {target} (epoch {state.epoch})",
            soft_wrap=True,
            highlight=False,
            markup=False,
        )


def _written_since(target: Path, started: float) -> list[tuple[Path, int, int]]:
    """The save point in ``target``'s sidecar if this command wrote it (after ``started``), else nothing."""
    from ..checkpoint import CheckpointError
    from ..finetune.state import read_sidecar_info, sidecar_path

    sidecar = sidecar_path(target)
    try:
        if sidecar.stat().st_mtime < started:
            return []
        info = read_sidecar_info(sidecar)
    except (OSError, CheckpointError):
        return []
    return [] if info is None else [(sidecar, int(info["epoch"]), int(info["step"]))]


def _interrupted(target: Path, saved: list[tuple[Path, int, int]], resume_command: str) -> str:
    """What Ctrl-C leaves behind, in words, with the command that continues."""
    if not saved:
        return (
            f"interrupted before the first save point: nothing was saved under {target}; "
            "run the same command again to start over"
        )
    sidecar, epoch, step = saved[-1]
    where = f"epoch {epoch} done" if step == 0 else f"epoch {epoch + 1} at step {step}"
    model = f"the model of epoch {epoch} in {target}, " if epoch else ""
    return f"interrupted: saved {where}: {model}the training state in {sidecar}; continue with:\n  {resume_command}"


def _resume_command(ctx: typer.Context | None, checkpoint: Path, data: Path, target: Path) -> str:
    """The command line as given, with ``--resume`` (and without ``--force``)."""
    words = ["dynconv", "finetune"]
    if ctx is None:  # called outside the command line: the essentials
        return shlex.join([*words, str(checkpoint), str(data), "-o", str(target), "--resume"])
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        source = ctx.get_parameter_source(param.name)
        if source is None or source.name == "DEFAULT" or param.name in ("resume", "force", "debug"):
            continue
        if param.param_type_name == "argument":
            words.append(str(value))
        elif param.is_flag:
            words.append(param.opts[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join([*words, "--resume"])


class _Display:
    """The header, a progress bar on a terminal (progress lines every ``log_every`` s elsewhere), epoch lines."""

    def __init__(self, epochs: int, log_every: float, rank: int) -> None:
        self.epochs, self.log_every, self.rank = epochs, log_every, rank
        self.done = 0
        self.last_line = time.monotonic()
        self.started = time.monotonic()
        self.terminal = err.is_terminal
        self.same_screen = out.is_terminal and err.is_terminal  # then epoch lines go above the bar
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps, eta"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[loss]}"),
            console=err,
            transient=True,
            disable=rank != 0 or not self.terminal,
            redirect_stdout=False,  # stdout may be a log file: its lines must not go to the terminal
            redirect_stderr=False,
        )
        self.task = self.bar.add_task(f"epoch 1/{epochs}", total=None, loss="")

    def _print(self, text: str) -> None:
        console = self.bar.console if self.same_screen else out
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    def header(self, info: dict[str, Any]) -> None:
        """What the run will do, before the first step."""
        prep = info["preprocessing"]
        kinds = ", ".join(f"{n} {k}" for k, n in info["kinds"].items()) or "no dynamic layers"
        annealing = info["annealing"]
        if annealing:
            temperature = "; ".join(
                f"{kind} {start:g} -> {end:g} over {info['temperature_steps']} steps"
                for kind, (start, end) in annealing.items()
            )
        else:
            temperature = "none anneals"
        resumed = info.get("resumed_at")
        self.done = resumed[0] if resumed else 0
        lines = [
            f"data: {info['train_images']} training and {info['val_images']} validation images, "
            f"{info['classes']} classes",
            f"input: {info['image_size']}x{info['image_size']}, mean {list(prep['mean'])} std {list(prep['std'])}, "
            f"{prep['interpolation']}, crop {prep['crop_pct']:g} (from {prep['source']})",
            f"{info['steps_per_epoch']} steps per epoch, {self.epochs} epochs; layers: {kinds}; "
            f"temperature: {temperature}",
        ]
        calibrated = info.get("calibrated")
        if calibrated:
            lines.append(
                f"routing calibrated on {calibrated['images']} training images: {calibrated['layers']} layers "
                f"input-dependent, same function; {calibrated['left']} left as they were"
            )
        if resumed:
            lines.append(f"resuming after epoch {resumed[0]}" + (f", step {resumed[1]}" if resumed[1] else ""))
        for line in lines:
            self._print(line)
        self.last_line = time.monotonic()

    def step(self, step: int, steps: int, loss: float) -> None:
        """The bar, or a progress line when ``log_every`` seconds have passed."""
        description = f"epoch {self.done + 1}/{self.epochs}"
        if self.terminal:
            if step == 1 or self.bar.tasks[0].total != steps:
                self.bar.reset(self.task, total=steps, description=description)
            self.bar.update(self.task, completed=step, loss=f"loss {loss:.3f}")
        elif self.rank == 0 and time.monotonic() - self.last_line >= self.log_every:
            self.last_line = time.monotonic()
            elapsed = time.monotonic() - self.started
            self._print(f"{description} step {step}/{steps}: loss {loss:.4f} ({elapsed:.0f} s)")

    def epoch(self, log: Any) -> None:
        """One line per finished epoch."""
        self.done = log.epoch
        ema = "" if log.ema_val_acc is None else f", EMA val acc {log.ema_val_acc:.3f} (saved: {log.weights})"
        self._print(render.epoch_line(log, self.epochs) + ema)
