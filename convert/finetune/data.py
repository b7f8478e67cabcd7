"""Image folders read with the checkpoint's preprocessing, and a seeded, resumable order of batches."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import UserError
from ..preprocessing import Preprocessing, eval_transform, train_transform


def image_folder_splits(
    root: Path,
    image_size: int | None,
    val_fraction: float,
    seed: int,
    *,
    preprocessing: Preprocessing | None = None,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    augment: bool = True,
    crop_min: float = 0.08,
) -> tuple[Dataset, Dataset, int]:
    """Train/val datasets from ``root/train`` + ``root/val``, or a seeded split of ``root``.

    Training images get timm's training transform (``augment=False``: the evaluation one),
    validation images the evaluation transform, both from ``preprocessing`` at ``image_size``.
    """
    from torchvision import datasets

    prep = (preprocessing or Preprocessing()).sized(image_size)
    evaluate = eval_transform(prep)
    train = (
        train_transform(prep, auto_augment=auto_augment, re_prob=re_prob, crop_min=crop_min) if augment else evaluate
    )
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"dataset folder {root} does not exist")
    try:
        if (root / "train").is_dir() and (root / "val").is_dir():
            train_set = datasets.ImageFolder(root / "train", train)
            return train_set, datasets.ImageFolder(root / "val", evaluate), len(train_set.classes)
        full_train, full_val = datasets.ImageFolder(root, train), datasets.ImageFolder(root, evaluate)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"{root} is not an image folder (one subfolder of images per class): {exc}") from None
    order = torch.randperm(len(full_train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(full_train) * val_fraction)) if val_fraction > 0 else 0
    if n_val == 0:
        return full_train, full_val, len(full_train.classes)
    return Subset(full_train, order[n_val:]), Subset(full_val, order[:n_val]), len(full_train.classes)


def epoch_order(size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[int]:
    """This process's shuffled sample indices for ``epoch``: the same for a run and its resumption."""
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    per_rank = size // world
    return order[rank::world][:per_rank]


def epoch_batches(
    dataset: Dataset, order: list[int], batch_size: int, *, first_step: int, steps: int, workers: int
) -> DataLoader:
    """Batches ``first_step`` .. ``steps - 1`` of an epoch in ``order`` (full batches only)."""
    chosen = order[first_step * batch_size : steps * batch_size]
    return DataLoader(
        Subset(dataset, chosen),
        batch_size,
        shuffle=False,
        num_workers=workers,
        drop_last=True,
        generator=torch.Generator().manual_seed(len(chosen)),  # keeps the global RNG untouched
    )


def steps_per_epoch(train_size: int, batch_size: int, world: int, cap: int | None) -> int:
    """Full batches per epoch for each process, at most ``cap``."""
    steps = (train_size // world) // batch_size
    if steps < 1:
        raise UserError(f"{train_size} training images are fewer than one batch of {batch_size} per process")
    return steps if cap is None else min(steps, cap)
