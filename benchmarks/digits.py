"""Real images that ship offline: scikit-learn's 1,797 handwritten digits as an image folder.

Each 8x8 grey scan is upsampled to ``size`` x ``size`` RGB PNG in ``root/<digit>/``,
the layout ``torchvision.datasets.ImageFolder`` (and ``dynconv finetune``) reads.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path, size: int = 32, limit: int | None = None) -> Path:
    """Write the digits (the first ``limit`` if given) under ``root``; return ``root``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = Path(root)
    images, labels = digits.images, digits.target
    count = len(images) if limit is None else min(limit, len(images))
    for i in range(count):
        pixels = (images[i] / 16.0 * 255).astype(np.uint8)
        picture = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
        folder = root / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        picture.save(folder / f"{i:04d}.png")
    return root
