"""Fashion-MNIST as in-memory tensors: train/validation/test splits resized once, batches as ImageNet inputs.

Reads the original idx files (``apt-get install dataset-fashion-mnist`` puts them in
``/usr/share/datasets/fashion-mnist/``) through ``torchvision.datasets.FashionMNIST``: the
files are unpacked once under ``CACHE/FashionMNIST/raw/``, where torchvision looks for them.
Images stay uint8 at the model's resolution; a batch becomes 3 replicated channels
normalised with ImageNet's mean and std (what ``dynconv analyze`` applies to a folder).
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

SYSTEM_DATA = Path("/usr/share/datasets/fashion-mnist")
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


class MissingDataError(RuntimeError):
    """The Fashion-MNIST idx files are neither in the data folder nor in the cache."""


@dataclass
class Split:
    """uint8 images ``[N, 1, S, S]`` and int64 labels ``[N]``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def link_raw(data: Path, cache: Path) -> Path:
    """Unpack (or copy) the four idx files from ``data`` into ``cache/FashionMNIST/raw``; return ``cache``."""
    raw = cache / "FashionMNIST" / "raw"
    if all((raw / name).is_file() for name in FILES):
        return cache
    missing = [n for n in FILES if not (data / n).is_file() and not (data / f"{n}.gz").is_file()]
    if missing:
        raise MissingDataError(
            f"Fashion-MNIST's idx files are not in {data} (missing {missing[0]}[.gz]): install them with "
            "`apt-get install dataset-fashion-mnist`, or online run "
            f"`torchvision.datasets.FashionMNIST('{cache}', download=True)` once."
        )
    raw.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        target = raw / name
        if (data / name).is_file():
            shutil.copyfile(data / name, target)
        else:
            with gzip.open(data / f"{name}.gz", "rb") as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    return cache


def _resized(images: torch.Tensor, size: int) -> torch.Tensor:
    """``[N, 28, 28]`` uint8 → ``[N, 1, size, size]`` uint8 (bilinear, in chunks to keep memory low)."""
    out = torch.empty(len(images), 1, size, size, dtype=torch.uint8)
    for start in range(0, len(images), 4096):
        chunk = images[start : start + 4096, None].float()
        resized = F.interpolate(chunk, size=(size, size), mode="bilinear", align_corners=False) if size != 28 else chunk
        out[start : start + 4096] = resized.round().clamp(0, 255).to(torch.uint8)
    return out


def load_splits(
    data: Path, cache: Path, size: int, *, train_size: int | None, val_size: int, test_size: int | None = None
) -> dict[str, Split]:
    """``train`` (a seeded subsample of what is left after ``val``), ``val`` (carved from train) and ``test``."""
    from torchvision.datasets import FashionMNIST

    root = link_raw(data, cache)
    train = FashionMNIST(str(root), train=True, download=False)
    test = FashionMNIST(str(root), train=False, download=False)
    order = torch.randperm(len(train.targets), generator=torch.Generator().manual_seed(0))
    val_idx, rest = order[:val_size], order[val_size:]
    train_idx = rest if train_size is None else rest[:train_size]
    test_idx = torch.arange(len(test.targets) if test_size is None else test_size)
    return {
        "train": Split(_resized(train.data[train_idx], size), train.targets[train_idx].clone()),
        "val": Split(_resized(train.data[val_idx], size), train.targets[val_idx].clone()),
        "test": Split(_resized(test.data[test_idx], size), test.targets[test_idx].clone()),
    }


def as_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 1, S, S]`` → float ``[B, 3, S, S]`` normalised as an ImageNet model expects."""
    x = images.float().div_(255).expand(-1, 3, -1, -1)
    return (x - MEAN) / STD


def write_folder(split: Split, root: Path, per_class: int) -> Path:
    """The first ``per_class`` images of each class as RGB PNGs in ``root/<class>/`` (for ``convert.analyze``)."""
    if root.is_dir():
        return root
    staging = root.with_name(f"{root.name}.{os.getpid()}.partial")  # processes may race to write it
    counts = dict.fromkeys(range(len(CLASSES)), 0)
    for i, (image, label) in enumerate(zip(split.images, split.labels.tolist(), strict=True)):
        if counts[label] >= per_class:
            continue
        counts[label] += 1
        folder = staging / f"{label}-{CLASSES[label]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").convert("RGB").save(folder / f"{i:05d}.png")
    try:
        staging.rename(root)
    except OSError:  # another process got there first
        shutil.rmtree(staging)
    return root
