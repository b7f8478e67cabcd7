"""The training loop: timm's optimizer, schedule, loss, mixup, AMP and EMA around a converted model.

Resumable at any save point: the loop hands a :class:`TrainingState` to ``on_save`` every
``save_every_steps`` steps and at each epoch end, and a state given back as ``resume``
continues the same run (same seed, same threads, ``workers=0`` for mid-epoch points).
Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in ``DistributedDataParallel``
(gloo on CPU, nccl on GPU), each rank reads its shard, and rank 0 reports and saves.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import dynconv
from dynconv.calibration import default_calibration_batches
from dynconv.temperature import annealed_buffers, annealed_kinds

from ..errors import UserError, WorkFailedError
from .config import TrainConfig
from .data import epoch_batches, epoch_order, steps_per_epoch
from .optimisation import build_loss, build_mixup, build_optimizer, build_scheduler, check_config
from .state import TrainingState, capture_rng, optimizer_state, restore_optimizer, restore_rng


@dataclass
class EpochLog:
    """One epoch's numbers; ``weights`` says whether the raw or the EMA weights did better on validation."""

    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    temperature: float | None
    seconds: float
    ema_val_acc: float | None = None
    weights: str = "raw"


@dataclass
class RunState:
    """Where a run is: epochs done, steps done in the current epoch, updates in all, history."""

    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    global_step: int = 0
    partial: dict[str, float] = field(default_factory=lambda: {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0})


@dataclass
class Hooks:
    """Callbacks of the loop (rank 0 only): the run's header, each step, each epoch end, mid-epoch saves."""

    on_start: Callable[[dict[str, Any]], None] | None = None
    on_step: Callable[[int, int, float], None] | None = None
    on_epoch: Callable[[EpochLog, nn.Module, TrainingState], None] | None = None
    on_save: Callable[[TrainingState], None] | None = None


def evaluate(model: nn.Module, loader: DataLoader, amp: str = "off") -> tuple[float, float, torch.Tensor]:
    """Mean loss, accuracy and the predictions over ``loader`` (eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    total_loss, correct, count, preds = 0.0, 0, 0, []
    with torch.no_grad(), autocast(device, amp):
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            logits = model(images).float()
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            pred = logits.argmax(1)
            correct += (pred == labels).sum().item()
            count += labels.numel()
            preds.append(pred.cpu())
    return total_loss / max(count, 1), correct / max(count, 1), torch.cat(preds) if preds else torch.empty(0)


def autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in bf16/fp16 when asked, else nothing."""
    if amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def seed_everything(seed: int) -> None:
    """Seed torch, Python and NumPy (timm's transforms and Mixup draw from the latter two)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def with_calibration_default(config: TrainConfig, model: nn.Module) -> TrainConfig:
    """``config`` with ``calibrate_routing`` resolved from ``model``'s kinds where it was left to them (``None``)."""
    if config.calibrate_routing is not None:
        return config
    kinds = (layer.kind for layer in dynconv.dynamic_layers(model).values())
    return replace(config, calibrate_routing=default_calibration_batches(kinds))


def calibrate(model: nn.Module, train_set: Dataset, config: TrainConfig, device: torch.device) -> dict | None:
    """:func:`dynconv.calibrate_routing` on ``config.calibrate_routing`` training batches (seeded, the same on
    every rank); ``None`` when off, else how many layers were calibrated and left alone."""
    if not config.calibrate_routing:
        return None
    count = min(len(train_set), config.calibrate_routing * config.batch_size)
    chosen = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(config.seed - 1))[:count]
    loader = DataLoader(Subset(train_set, chosen.tolist()), config.batch_size, num_workers=config.workers)
    with seeded(config.seed - 1):  # the training transform draws from every RNG: the same batches in any process
        report = dynconv.calibrate_routing(model, (images.to(device) for images, _ in loader), seed=config.seed)
    return {"layers": len(report.calibrated), "left": len(report.skipped), "images": report.samples}


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block from :func:`seed_everything`'s state, then put every RNG back as it was."""
    saved = capture_rng()
    seed_everything(seed)
    try:
        yield
    finally:
        restore_rng(*saved)


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)``, initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def _device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def train_model(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    config: TrainConfig,
    *,
    classes: int | None = None,
    resume: TrainingState | None = None,
    hooks: Hooks | None = None,
    describe: dict[str, Any] | None = None,
) -> RunState:
    """Train ``model`` (static or converted) for ``config.epochs``; resumable from a saved state."""
    check_config(config)
    config = with_calibration_default(config, model)
    hooks = hooks or Hooks()
    rank, world = _distributed()
    device = _device()
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    steps = steps_per_epoch(len(train_set), config.batch_size, world, config.max_steps_per_epoch)
    calibrated = calibrate(model, train_set, config, device) if resume is None else None
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps)
    # calibrated routers are sized for temperature 1: nothing anneals
    fixed = {"start": 1.0, "end": 1.0} if config.calibrate_routing else {}
    temperature = dynconv.TemperatureSchedule(model, max(1, math.ceil(config.temperature_epochs * steps)), **fixed)
    mixup = build_mixup(config, classes or 0)
    loss_fn = build_loss(config, mixup)
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None
    ema = None
    if config.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=config.model_ema_decay)
    run = RunState()
    if resume is not None:
        run = _restore(resume, model, ema, optimizer, scheduler, temperature, scaler)
    if hooks.on_start is not None and rank == 0:
        kinds: dict[str, int] = {}
        for layer in dynconv.dynamic_layers(model).values():
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        annealing = {} if config.calibrate_routing else annealed_kinds(model)
        hooks.on_start(
            {
                **(describe or {}),
                "train_images": len(train_set),
                "val_images": len(val_set),
                "steps_per_epoch": steps,
                "kinds": kinds,
                "annealing": annealing,
                "temperature_steps": temperature.steps if annealing else 0,
                "resumed_at": (run.epoch, run.step) if resume is not None else None,
                "calibrated": calibrated,
            }
        )
    val_loader = DataLoader(val_set, config.batch_size, num_workers=config.workers, generator=torch.Generator())
    non_router = list(dynconv.expert_parameters(model)) + list(dynconv.other_parameters(model))
    if resume is not None:
        restore_rng(resume.info["rng"], resume.tensors)
    for epoch in range(run.epoch, config.epochs):
        # Router warm-up: drop the other gradients after backward (toggling requires_grad would
        # break DistributedDataParallel, which registers its hooks once).
        frozen = non_router if epoch < config.router_warmup_epochs else []
        if run.step == 0:
            seed_everything(config.seed * 1_000 + epoch)
        order = epoch_order(len(train_set), config.seed, epoch, rank, world)
        loader = epoch_batches(
            train_set, order, config.batch_size, first_step=run.step, steps=steps, workers=config.workers
        )
        start = time.perf_counter()
        net.train()
        if ema is not None:
            ema.module.eval()
        for images, labels in loader:
            images, labels = images.to(device), labels.to(device)
            if config.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            targets = labels
            if mixup is not None:
                images, targets = mixup(images, labels)
            with autocast(device, config.amp):
                logits = net(images)
                loss = loss_fn(logits.float(), targets)
            optimizer.zero_grad(set_to_none=True)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            for p in frozen:
                p.grad = None
            if config.clip_grad is not None:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            run.global_step += 1
            if scheduler is not None:
                scheduler.step_update(run.global_step)
            temperature.step()
            if ema is not None:
                ema.update(model, step=run.global_step)
                _copy_temperatures(model, ema.module)
            run.partial["loss_sum"] += loss.item() * labels.numel()
            run.partial["correct"] += (logits.argmax(1) == labels).sum().item()
            run.partial["seen"] += labels.numel()
            run.step += 1
            if rank == 0 and hooks.on_step is not None:
                hooks.on_step(run.step, steps, loss.item())
            every = config.save_every_steps
            if rank == 0 and hooks.on_save is not None and every > 0 and run.step % every == 0 and run.step < steps:
                hooks.on_save(_snapshot(run, model, ema, optimizer, scheduler, temperature, scaler))
        val_loss, val_acc, _ = evaluate(model, val_loader, config.amp)
        chosen, ema_acc = model, None
        if ema is not None:
            _, ema_acc, _ = evaluate(ema.module, val_loader, config.amp)
            chosen = ema.module if ema_acc > val_acc else model
        seen = max(run.partial["seen"], 1)
        log = EpochLog(
            epoch + 1,
            run.partial["loss_sum"] / seen,
            run.partial["correct"] / seen,
            val_loss,
            val_acc,
            temperature.value(),
            time.perf_counter() - start,
            ema_acc,
            "ema" if chosen is not model else "raw",
        )
        run.epoch, run.step = epoch + 1, 0
        run.partial = {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0}
        run.history.append(asdict(log))
        if world > 1:
            check_replicas(model)
        if hooks.on_epoch is not None and rank == 0:
            hooks.on_epoch(log, chosen, _snapshot(run, model, ema, optimizer, scheduler, temperature, scaler))
        if world > 1:
            dist.barrier()
    return run


def _copy_temperatures(model: nn.Module, ema_model: nn.Module) -> None:
    """The EMA copy routes at the live temperature (averaging an annealed temperature would lag it)."""
    with torch.no_grad():
        for (live, _, _), (averaged, _, _) in zip(annealed_buffers(model), annealed_buffers(ema_model), strict=True):
            averaged.copy_(live)


def _snapshot(run, model, ema, optimizer, scheduler, temperature, scaler) -> TrainingState:
    """The state at this save point: weights, EMA, optimizer, schedules, scaler, RNG and position."""
    optim_info, optim_tensors = optimizer_state(optimizer)
    rng_info, rng_tensors = capture_rng()
    info = {
        "epoch": run.epoch,
        "step": run.step,
        "global_step": run.global_step,
        "history": run.history,
        "partial": run.partial,
        "optimizer": optim_info,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "temperature": temperature.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_info,
    }
    tensors = {**optim_tensors, **rng_tensors, **{f"model.{k}": v for k, v in model.state_dict().items()}}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.module.state_dict().items()})
    return TrainingState(info, tensors)


def _restore(state: TrainingState, model, ema, optimizer, scheduler, temperature, scaler) -> RunState:
    """Put a saved state back into the run's objects; return its position."""
    info = state.info
    model.load_state_dict(state.section("model"))
    if ema is not None:
        ema.module.load_state_dict(state.section("ema") or state.section("model"))
    try:
        restore_optimizer(optimizer, info["optimizer"], state.tensors)
    except (ValueError, KeyError, IndexError):  # its parameter groups are not this model's
        raise UserError(
            "the saved optimizer state does not fit this model's parameters (written by another dynconv version, "
            "e.g. format-2 ODConv or DCD routers, whose heads are one layer now), so the run cannot resume; "
            "fine-tune the last written model instead"
        ) from None
    if scheduler is not None and info.get("scheduler"):
        scheduler.load_state_dict(info["scheduler"])
    temperature.load_state_dict(info["temperature"])
    if scaler is not None and info.get("scaler"):
        scaler.load_state_dict(info["scaler"])
    return RunState(info["epoch"], list(info["history"]), info["step"], info["global_step"], dict(info["partial"]))


def parameter_checksum(model: nn.Module) -> torch.Tensor:
    """A float64 fingerprint of every parameter (sum and a position-weighted sum).

    Buffers are left out: BatchNorm's running statistics legitimately differ between
    ranks after their last local forward (DDP re-broadcasts rank 0's at each forward).
    """
    total = torch.zeros(2, dtype=torch.float64)
    for tensor in model.parameters():
        flat = tensor.detach().double().cpu().flatten()
        total[0] += flat.sum()
        total[1] += (flat * torch.linspace(1, 2, flat.numel(), dtype=torch.float64)).sum()
    return total


def check_replicas(model: nn.Module) -> None:
    """Raise if the data-parallel replicas have drifted apart (they must stay identical)."""
    mine = parameter_checksum(model)
    gathered = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise WorkFailedError(f"data-parallel replicas differ: checksums {[g.tolist() for g in gathered]}")
