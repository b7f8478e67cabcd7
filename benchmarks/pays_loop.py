"""The training loop of the "does it pay?" benchmark: what a user's own loop on in-memory tensors looks like.

``dynconv.parameter_groups`` → ``timm.optim.create_optimizer_v2`` → ``timm.scheduler.create_scheduler_v2``
(cosine with a short warm-up, stepped per update), plain cross-entropy, a seeded data order
and horizontal flips shared by every model trained with the same seed. Static and converted
models run through exactly this loop.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from fashion import Split, as_input
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn

import dynconv
from dynconv.temperature import annealed_buffers

#: Base learning rate per optimizer; a run's rate is this times its ``lr_mult``.
BASE_LR = {"sgd": 0.02, "adamw": 5e-4}
#: What a user's loop imports; recorded so the report names it.
LOOP = "dynconv.parameter_groups → timm create_optimizer_v2 → timm create_scheduler_v2 (cosine, per-step)"


@dataclass(frozen=True)
class Settings:
    """How one model is trained (``kind``'s conversion options live in ``convert``)."""

    opt: str = "adamw"  # the project's default (convert/finetune/config.py), chosen by the sweep
    lr_mult: float = 1.0
    weight_decay: float = 5e-5
    router_lr_scale: float | None = None  # None: the library's router multiplier (x1); else replaces it
    match: int = 1  # 1: the library's per-layer multipliers (kernel step as the original's); 0: one lr for all
    warmup: float = 0.05  # fraction of the run's steps
    temp_frac: float = 0.5  # softmax temperatures anneal 30 -> 1 over this fraction of the run
    batch_size: int = 64
    calibrate: int = 0  # training batches dynconv.calibrate_routing reads before training (0: uniform routing)
    convert: tuple[tuple[str, Any], ...] = ()  # extra ``convert.convert_model`` options (noise, router init, ...)

    @property
    def lr(self) -> float:
        return BASE_LR[self.opt] * self.lr_mult

    def label(self) -> str:
        """Short text of the non-default settings."""
        default = Settings()
        parts = [f"{k}={v}" for k, v in asdict(self).items() if k != "convert" and v != getattr(default, k)]
        parts += [f"{k}={v}" for k, v in self.convert]
        return " ".join(parts) or "defaults"


@dataclass
class TrainLog:
    steps: int
    seconds: float
    steps_per_epoch: int
    losses: list[float] = field(default_factory=list)  # mean train loss per epoch

    @property
    def epoch_seconds(self) -> float:
        return self.seconds * self.steps_per_epoch / max(self.steps, 1)


def optimizer_groups(model: nn.Module, settings: Settings) -> list[dict]:
    """``dynconv.parameter_groups`` for the optimizer; without ``match``, every group back at the one rate.

    ``match=0`` is what a loop that ignores the multipliers does (the old benchmark): routers
    at ``lr x router_lr_scale``, everything else at ``lr``, weight decay as given.
    """
    groups = dynconv.parameter_groups(
        model, router_lr_scale=settings.router_lr_scale, lr=settings.lr, optimizer=settings.opt,
        weight_decay=settings.weight_decay,
    )  # fmt: skip
    if not settings.match:
        for group in groups:
            router = group["name"].startswith("routers")
            group["lr"] = settings.lr * ((settings.router_lr_scale or 1.0) if router else 1.0)
            group["lr_multiplier"] = group["lr"] / settings.lr
            if group["weight_decay"]:
                group["weight_decay"] = settings.weight_decay
    return groups


def batch_order(seed: int, epoch: int, count: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Index batches and flip masks of one epoch: the same for every model trained with ``seed``."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(count, generator=generator)
    flips = torch.rand(count, generator=generator) < 0.5
    starts = range(0, count - batch_size + 1, batch_size)
    return [(order[i : i + batch_size], flips[i : i + batch_size]) for i in starts]


def train(model: nn.Module, split: Split, settings: Settings, *, seed: int, steps: int) -> TrainLog:
    """Train ``model`` for ``steps`` updates (epochs of ``split`` in the seed's order); time only the updates."""
    per_epoch = len(split) // settings.batch_size
    if per_epoch == 0:
        raise ValueError(f"{len(split)} training images make no batch of {settings.batch_size}")
    optimizer = create_optimizer_v2(optimizer_groups(model, settings), opt=settings.opt, lr=settings.lr)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=steps,
        warmup_epochs=max(1, round(settings.warmup * steps)),
        warmup_lr=settings.lr * 0.01,
        step_on_epochs=False,
        updates_per_epoch=1,
    )
    # Only the kinds that anneal (DyConv 30 -> 1) are touched; ODConv keeps its own temperature
    # (until this fix every router, ODConv's too, was set to 30). Calibrated routers are not annealed.
    temperature = None
    annealed = annealed_buffers(model)
    if annealed and settings.temp_frac > 0 and not settings.calibrate:
        temperature = dynconv.TemperatureSchedule(model, max(1, math.ceil(settings.temp_frac * steps)), start=30.0)
    else:
        for buffer, _, end in annealed:
            buffer.fill_(end)
    torch.manual_seed(seed)  # dropout masks
    log = TrainLog(steps=0, seconds=0.0, steps_per_epoch=per_epoch)
    model.train()
    epoch = 0
    while log.steps < steps:
        total = 0.0
        batches = batch_order(seed, epoch, len(split), settings.batch_size)[: steps - log.steps]
        start = time.perf_counter()
        for index, flip in batches:
            x = as_input(split.images[index])
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.cross_entropy(model(x), split.labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            log.steps += 1
            scheduler.step_update(log.steps)
            if temperature is not None:
                temperature.step()
            total += float(loss.detach())
        log.seconds += time.perf_counter() - start
        log.losses.append(total / max(len(batches), 1))
        epoch += 1
        print(f"  epoch {epoch}: loss {log.losses[-1]:.4f}, {time.perf_counter() - start:.0f} s", flush=True)
    return log


def accuracy(model: nn.Module, split: Split, batch_size: int = 500) -> float:
    """Top-1 accuracy on ``split`` (eval mode)."""
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(split), batch_size):
            logits = model(as_input(split.images[i : i + batch_size]))
            correct += int((logits.argmax(1) == split.labels[i : i + batch_size]).sum())
    return correct / len(split)


def max_logit_diff(a: nn.Module, b: nn.Module, split: Split, count: int = 256) -> float:
    """Largest |a(x) - b(x)| over the first ``count`` images (eval mode): ≈ 0 for an exact conversion."""
    a.eval(), b.eval()
    x = as_input(split.images[:count])
    with torch.inference_mode():
        return float((a(x) - b(x)).abs().max())
