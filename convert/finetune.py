"""Fine-tuning converted checkpoints on an image folder, resumable, single-process or under torchrun.

Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
``DistributedDataParallel`` (gloo on CPU, nccl on GPU), each rank reads its shard
of the data, and rank 0 logs and writes the checkpoint; one machine or many is
torchrun's business (``torchrun --nnodes ...``), not ours.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

import dynconv

from .checkpoint import CheckpointError, load_checkpoint, read_training_state, save_checkpoint
from .converter import CONVERSION_ATTR
from .errors import UserError, WorkFailedError, check_output_path
from .heads import replace_head

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TrainConfig:
    """Fine-tuning settings; everything that changes the run is recorded in the checkpoint."""

    epochs: int = 5
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64
    image_size: int | None = None  # default: the checkpoint's probe size
    val_fraction: float = 0.1
    temperature_epochs: float = 10.0  # DyConv paper: 30 -> 1 over the first 10 epochs
    temperature_start: float = 30.0
    router_warmup_epochs: int = 0  # epochs training the routers alone
    router_lr_scale: float = 1.0
    max_steps_per_epoch: int | None = None
    seed: int = 0
    workers: int = 0


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    temperature: float | None
    seconds: float


@dataclass
class RunState:
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def image_folder_splits(root: Path, image_size: int, val_fraction: float, seed: int) -> tuple[Dataset, Dataset, int]:
    """Train/val datasets from ``root/train`` + ``root/val``, or a seeded split of ``root``."""
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train, val = datasets.ImageFolder(root / "train", tf), datasets.ImageFolder(root / "val", tf)
            return train, val, len(train.classes)
        full = datasets.ImageFolder(root, tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"{root} is not an image folder (one subfolder of images per class): {exc}") from None
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(full) * val_fraction))
    return Subset(full, order[n_val:]), Subset(full, order[:n_val]), len(full.classes)


def evaluate(model: nn.Module, loader: DataLoader) -> tuple[float, float, torch.Tensor]:
    """Mean loss, accuracy and the predictions over ``loader`` (eval mode)."""
    model.eval()
    total_loss, correct, count, preds = 0.0, 0, 0, []
    with torch.no_grad():
        for images, labels in loader:
            logits = model(images)
            total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
            pred = logits.argmax(1)
            correct += (pred == labels).sum().item()
            count += labels.numel()
            preds.append(pred)
    return total_loss / max(count, 1), correct / max(count, 1), torch.cat(preds) if preds else torch.empty(0)


def _optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An optimizer's state as JSON-able info plus flat tensors (for safetensors)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return {"param_groups": state["param_groups"], "scalars": scalars}, tensors


def _restore_optimizer(optimizer: torch.optim.Optimizer, info: dict[str, Any], tensors: dict[str, torch.Tensor]):
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in info["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": info["param_groups"]})


def _distributed() -> tuple[int, int]:
    """``(rank, world_size)``, initialising the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def train_model(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    config: TrainConfig,
    *,
    state: RunState | None = None,
    optimizer_state: tuple[dict[str, Any], dict[str, torch.Tensor]] | None = None,
    on_epoch: Callable[[EpochLog, nn.Module, torch.optim.Optimizer, RunState], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> RunState:
    """Train ``model`` (static or converted) for ``config.epochs``; resumable from ``state``."""
    rank, world = _distributed()
    state = state or RunState()
    sampler = DistributedSampler(train_set, world, rank, seed=config.seed) if world > 1 else None
    train_loader = DataLoader(
        train_set,
        config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=config.workers,
        drop_last=len(train_set) > config.batch_size * world,
    )
    val_loader = DataLoader(val_set, config.batch_size, num_workers=config.workers)
    steps = (
        len(train_loader) if config.max_steps_per_epoch is None else min(len(train_loader), config.max_steps_per_epoch)
    )
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    groups = dynconv.parameter_groups(
        model, config.router_lr_scale, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    optimizer = torch.optim.SGD(groups)
    if optimizer_state is not None:
        _restore_optimizer(optimizer, *optimizer_state)
    has_temperature = dynconv.set_temperature(model, config.temperature_start) > 0
    schedule = None
    if has_temperature:
        schedule = dynconv.TemperatureSchedule(
            model, max(1, math.ceil(config.temperature_epochs * steps)), start=config.temperature_start
        )
        schedule.load_state_dict({**schedule.state_dict(), "count": state.epoch * steps})
    non_router = list(dynconv.expert_parameters(model)) + list(dynconv.other_parameters(model))
    for epoch in range(state.epoch, config.epochs):
        # Router warm-up: drop the other gradients after backward (toggling requires_grad would
        # break DistributedDataParallel, which registers its hooks once).
        frozen = non_router if epoch < config.router_warmup_epochs else []
        torch.manual_seed(config.seed + epoch)  # per-epoch seed: a resumed run repeats the same epochs
        if sampler is not None:
            sampler.set_epoch(epoch)
        start = time.perf_counter()
        net.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for step, (images, labels) in enumerate(train_loader):
            if step >= steps:
                break
            logits = net(images)
            loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p in frozen:
                p.grad = None
            optimizer.step()
            if schedule is not None:
                schedule.step()
            loss_sum += loss.item() * labels.numel()
            correct += (logits.argmax(1) == labels).sum().item()
            seen += labels.numel()
            if progress is not None and rank == 0:
                progress(step + 1, steps, loss.item())
        val_loss, val_acc, _ = evaluate(model, val_loader)
        log = EpochLog(
            epoch + 1,
            loss_sum / max(seen, 1),
            correct / max(seen, 1),
            val_loss,
            val_acc,
            schedule.value() if schedule is not None else None,
            time.perf_counter() - start,
        )
        state.epoch = epoch + 1
        state.history.append(asdict(log))
        if world > 1:
            check_replicas(model)
        if on_epoch is not None and rank == 0:
            on_epoch(log, model, optimizer, state)
        if world > 1:
            dist.barrier()
    return state


def parameter_checksum(model: nn.Module) -> torch.Tensor:
    """A float64 fingerprint of every parameter (sum and a position-weighted sum).

    Buffers are left out: BatchNorm's running statistics legitimately differ between
    ranks after their last local forward (DDP re-broadcasts rank 0's at each forward).
    """
    total = torch.zeros(2, dtype=torch.float64)
    for tensor in model.parameters():
        flat = tensor.detach().double().flatten()
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


def finetune(
    checkpoint: Path,
    data: Path,
    output: Path,
    config: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    log: Callable[[EpochLog], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    num_classes: int | None = None,
    model: nn.Module | None = None,
) -> RunState:
    """Fine-tune a converted checkpoint on an image folder; write ``output`` after every epoch.

    With ``resume``, continue from ``output``'s own saved epoch, optimizer and schedule.
    ``num_classes`` (the folder's class count) gives a model that predicts another number
    of classes a new head first, recorded in the output. ``model`` is the base module of
    a checkpoint converted from custom code (see :func:`~convert.load_checkpoint`).
    """
    checkpoint, data, output = Path(checkpoint), Path(data), Path(output)
    state, optimizer_state, source = RunState(), None, checkpoint
    if resume:
        saved = read_training_state(output)
        if saved is None:
            raise CheckpointError(f"{output} holds no training state to resume from")
        info, tensors = saved
        if info["config"] != _recorded(config):
            raise UserError(f"{output} was trained with other settings ({info['config']}); resume with the same ones")
        state = RunState(info["epoch"], info["history"])
        optimizer_state, source = (info["optimizer"], tensors), output
    else:
        check_output_path(output, overwrite)
    base = model
    model = load_checkpoint(source, model=base)
    size = config.image_size or int(dynconv_input_size(model))
    train_set, val_set, classes = image_folder_splits(data, size, config.val_fraction, config.seed)
    if num_classes is not None and num_classes != classes:
        raise UserError(f"a head for {num_classes} classes was asked for, but {data} has {classes} classes")
    outputs = _output_classes(model, size)
    if outputs != classes:
        if num_classes is None:
            raise UserError(
                f"the model predicts {outputs} classes but {data} has {classes}; give it a new head for them",
                cli_hint=f"--num-classes {classes}",
            )
        new_head(model, classes, config.seed)

    def save(epoch_log: EpochLog, trained: nn.Module, optimizer: torch.optim.Optimizer, run: RunState) -> None:
        info, tensors = _optimizer_state(optimizer)
        meta = {
            "epoch": run.epoch,
            "history": run.history,
            "config": _recorded(config),
            "optimizer": info,
            "source": str(checkpoint),
            "data": str(data),
        }
        save_checkpoint(trained, output, overwrite=True, training=(meta, tensors))
        if log is not None:
            log(epoch_log)

    return train_model(
        model,
        train_set,
        val_set,
        config,
        state=state,
        optimizer_state=optimizer_state,
        on_epoch=save,
        progress=progress,
    )


def new_head(model: nn.Module, num_classes: int, seed: int = 0) -> list[str]:
    """Give a converted model (in place) a new classifier head, recorded so its checkpoint rebuilds it."""
    conversion = getattr(model, CONVERSION_ATTR)
    names = replace_head(model, num_classes, seed)
    conversion.head = {"num_classes": num_classes, "layers": names}
    conversion.layers = [r for r in conversion.layers if not set(r["names"]) & set(names)]
    return names


def _recorded(config: TrainConfig) -> dict[str, Any]:
    """The settings that must match for a resume to continue the same run."""
    return {k: v for k, v in asdict(config).items() if k not in ("workers", "epochs")}


def dynconv_input_size(model: nn.Module) -> int:
    conversion = getattr(model, CONVERSION_ATTR, None)
    return conversion.input_shape[1] if conversion is not None else 224


def _output_classes(model: nn.Module, size: int) -> int:
    model.eval()
    with torch.no_grad():
        return int(model(torch.zeros(1, 3, size, size)).shape[1])
