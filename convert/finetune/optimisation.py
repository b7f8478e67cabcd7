"""Optimizer, learning-rate schedule, loss and mixup from timm's factories, by name.

The role groups of :func:`dynconv.parameter_groups` (routers with their learning-rate
multiplier, experts, the rest) feed ``timm.optim.create_optimizer_v2``; the schedule is
``timm.scheduler.create_scheduler_v2`` stepped per update.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import dynconv

from ..errors import UserError
from .config import TrainConfig


def optimizer_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """``dynconv.parameter_groups`` for ``config.opt``: per-layer learning rates, timm's no-decay split."""
    try:
        return dynconv.parameter_groups(
            model,
            config.router_lr_scale,
            lr=config.lr,
            optimizer=config.opt,
            weight_decay=config.weight_decay,
        )
    except ValueError as exc:
        raise UserError(f"optimizer {config.opt!r}: {exc}", cli_hint="--opt momentum") from None


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer ``config.opt`` over the role groups."""
    from timm.optim import create_optimizer_v2

    kwargs = {"momentum": config.momentum} if config.opt in ("sgd", "momentum", "nesterov") else {}
    try:
        return create_optimizer_v2(
            optimizer_groups(model, config), opt=config.opt, lr=config.lr, weight_decay=config.weight_decay, **kwargs
        )
    except (ValueError, AssertionError) as exc:
        raise UserError(f"optimizer {config.opt!r}: {exc}", cli_hint="--opt momentum") from None


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, steps_per_epoch: int) -> Any:
    """timm's schedule ``config.sched`` over ``config.epochs``, updated every step; ``None`` for ``none``."""
    from timm.scheduler import create_scheduler_v2

    if config.sched not in ("cosine", "step", "none"):
        raise UserError(f"unknown schedule {config.sched!r}: use cosine, step or none", cli_hint="--sched cosine")
    if config.sched == "none":
        return None
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=config.sched,
        num_epochs=config.epochs,
        decay_epochs=config.decay_epochs,
        min_lr=config.min_lr,
        warmup_lr=config.warmup_lr,
        warmup_epochs=config.warmup_epochs,  # type: ignore[arg-type]  # timm multiplies by updates_per_epoch
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler


def build_mixup(config: TrainConfig, classes: int) -> Any:
    """timm's ``Mixup`` when ``--mixup`` or ``--cutmix`` is set (it also smooths the labels), else ``None``."""
    if config.mixup <= 0 and config.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.smoothing, num_classes=classes
    )


def build_loss(config: TrainConfig, mixup: Any) -> nn.Module:
    """Soft-target cross-entropy under mixup, label-smoothing cross-entropy, or plain cross-entropy."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup is not None:
        return SoftTargetCrossEntropy()
    if config.smoothing > 0:
        return LabelSmoothingCrossEntropy(config.smoothing)
    return nn.CrossEntropyLoss()


def check_config(config: TrainConfig) -> None:
    """One clear sentence for settings that cannot work."""
    if config.amp not in ("off", "bf16", "fp16"):
        raise UserError(f"unknown --amp {config.amp!r}: use off, bf16 or fp16")
    if config.amp == "fp16" and not torch.cuda.is_available():
        raise UserError("--amp fp16 needs CUDA (a grad scaler); on CPU use --amp bf16", cli_hint="--amp bf16")
    if config.epochs < 1 or config.batch_size < 1:
        raise UserError(f"epochs and batch size must be at least 1, got {config.epochs} and {config.batch_size}")
    if not 0 < config.crop_min <= 1:
        raise UserError(f"--crop-min is an area share in (0, 1], got {config.crop_min}")
    if config.calibrate_routing is not None and config.calibrate_routing < 0:
        raise UserError(f"--calibrate-routing is a number of batches, at least 0, got {config.calibrate_routing}")
    if (config.mixup > 0 or config.cutmix > 0) and config.batch_size % 2:
        raise UserError(f"mixup and cutmix need an even batch size, got {config.batch_size}")
