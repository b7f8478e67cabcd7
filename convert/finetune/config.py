"""Fine-tuning settings: every default and its help text in one place; the CLI derives its options from here.

Defaults are the setting the "does it pay?" benchmark (benchmarks/results/pays.md) found
best on its validation split for every kind and for the static model: AdamW, learning rate
5e-4, weight decay 5e-5 (not on norms and biases), a cosine schedule with a one-epoch linear
warm-up, per step. SGD-momentum (lr 0.02 there; ``--opt momentum --lr 0.02``) was 0.2-0.5 points
behind it on every kind there, and no kind diverged under AdamW. Calibrated routing
(``calibrate_routing``) is each kind's: on for CondConv, whose calibrated arm was its best on that
validation split at 20,000 training images (+0.08 points; one seed, within the seeds' spread) and
whose routing it makes image-dependent; off for the others, which scored 0.14-0.18 points below
the uniform start at 4,000 and whose softmax routing collapsed onto one expert from it
(benchmarks/results/routing_learns.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Fine-tuning settings; everything that changes the run is recorded with the output."""

    epochs: int = _opt(5, "epochs in total (a resumed run continues to this)")
    batch_size: int = _opt(64, "images per step, per process")
    image_size: int | None = _opt(None, "square input size; default: the checkpoint's recorded preprocessing")
    val_fraction: float = _opt(0.1, "held-out share of a folder without train/ and val/")
    opt: str = _opt("adamw", "optimizer by timm name: sgd (Nesterov), momentum, adamw, lamb, ...")
    lr: float = _opt(5e-4, "peak learning rate (routers: x their kind's multiplier or --router-lr-scale)")
    momentum: float = _opt(0.9, "SGD momentum")
    weight_decay: float = _opt(5e-5, "weight decay, not applied to norms and biases")
    sched: str = _opt("cosine", "learning-rate schedule by timm name: cosine, step, none")
    warmup_epochs: float = _opt(1.0, "linear warm-up from warmup_lr, in epochs (per step)")
    warmup_lr: float = _opt(1e-5, "learning rate at the start of the warm-up")
    min_lr: float = _opt(0.0, "learning rate at the end of the cosine schedule")
    decay_epochs: float = _opt(2.0, "step schedule: epochs between decays (x0.1)")
    smoothing: float = _opt(0.0, "label smoothing")
    mixup: float = _opt(0.0, "mixup alpha (timm Mixup with soft-target cross-entropy); 0: off")
    cutmix: float = _opt(0.0, "cutmix alpha; 0: off")
    augment: bool = _opt(True, "timm's training transform for training images (off: the evaluation transform)")
    crop_min: float = _opt(0.08, "smallest area share of the random-resized crop (timm's scale=(crop_min, 1))")
    aa: str | None = _opt(None, "RandAugment policy, e.g. rand-m9-mstd0.5 (timm auto_augment)")
    reprob: float = _opt(0.0, "random erasing probability")
    clip_grad: float | None = _opt(None, "clip the gradient norm to this")
    amp: str = _opt("off", "mixed precision: off, bf16 (CPU and CUDA), fp16 (CUDA, with a grad scaler)")
    channels_last: bool = _opt(False, "channels-last memory format for the model and the inputs")
    model_ema: bool = _opt(False, "keep an exponential moving average of the weights (timm ModelEmaV3)")
    model_ema_decay: float = _opt(0.9998, "EMA decay per step")
    temperature_epochs: float = _opt(
        10.0, "epochs over which kinds that anneal their router temperature do so (DyConv: 30 -> 1); others keep theirs"
    )
    calibrate_routing: int | None = _opt(
        None,
        "training batches that set fresh routers from the data before the first step (dynconv.calibrate_routing: "
        "input-dependent routing, same function, no temperature annealing); 0: routing starts uniform; "
        "default: each kind's (4 when every dynamic layer is CondConv, else 0)",
    )
    router_warmup_epochs: int = _opt(0, "first epochs train the routers only")
    router_lr_scale: float | None = _opt(
        None, "router learning rate = lr x this; default: each kind's (AdamW 1; SGD 30 softmax kinds, 1 CondConv, DCD)"
    )
    max_steps_per_epoch: int | None = _opt(None, "cap steps per epoch (smoke runs)")
    save_every_steps: int = _opt(0, "also save the resumable state every N steps inside an epoch; 0: at epoch ends")
    seed: int = _opt(0, "data split, order, augmentation and new-head seed")
    workers: int = _opt(0, "data-loading processes (0: in the training process, exact resume mid-epoch)")

    def recorded(self) -> dict[str, Any]:
        """The settings that must match for a resume to continue the same run."""
        skip = {"workers", "epochs", "save_every_steps"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


def default(name: str) -> Any:
    """The default of setting ``name``."""
    return TrainConfig.__dataclass_fields__[name].default


def help_text(name: str) -> str:
    """The help text of setting ``name``."""
    return TrainConfig.__dataclass_fields__[name].metadata["help"]
