"""The preprocessing a converted model expects, recorded in its checkpoint and used by every command.

timm models: ``timm.data.resolve_data_config`` from their ``pretrained_cfg`` (mean/std,
interpolation, crop percentage); torchvision models: their default weights' transforms;
anything else: ImageNet's. The input size is the one the model was converted at. Training
and evaluation transforms are timm's ``create_transform`` with these settings.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from .converter import CONVERSION_ATTR

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """Input size ``(C, H, W)``, normalisation, resize interpolation and centre-crop fraction."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"
    source: str = "imagenet"  # where the values came from: timm, torchvision or imagenet

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        for key in ("input_size", "mean", "std"):
            if key in known:
                known[key] = tuple(known[key])
        return cls(**known)

    def sized(self, image_size: int | None) -> Preprocessing:
        """The same preprocessing at ``image_size`` pixels square (``None``: unchanged)."""
        if image_size is None:
            return self
        return Preprocessing(**{**asdict(self), "input_size": (self.input_size[0], image_size, image_size)})


def resolve_preprocessing(model: nn.Module) -> Preprocessing:
    """The base model's preprocessing (timm's config, torchvision's weights), at its converted input size."""
    conversion = getattr(model, CONVERSION_ATTR, None)
    found = Preprocessing()
    if getattr(model, "pretrained_cfg", None):
        from timm.data import resolve_data_config

        cfg = resolve_data_config({}, model=model)
        found = Preprocessing(
            tuple(cfg["input_size"]),
            tuple(cfg["mean"]),
            tuple(cfg["std"]),
            str(cfg.get("interpolation") or "bilinear"),
            float(cfg.get("crop_pct") or 0.875),
            str(cfg.get("crop_mode") or "center"),
            "timm",
        )
    elif conversion is not None and conversion.base.source == "torchvision":
        found = _torchvision_preprocessing(conversion.base.name) or found
    if conversion is not None:
        found = Preprocessing(**{**asdict(found), "input_size": tuple(int(v) for v in conversion.input_shape)})
    return found


def _torchvision_preprocessing(name: str) -> Preprocessing | None:
    """From the default weights' ``transforms()`` of torchvision model ``name``, if it has weights."""
    from torchvision.models import get_model_weights

    try:
        transforms = get_model_weights(name).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):
        return None
    crop, resize = int(transforms.crop_size[0]), int(transforms.resize_size[0])
    return Preprocessing(
        (3, crop, crop),
        tuple(transforms.mean),
        tuple(transforms.std),
        transforms.interpolation.value,
        crop / resize,
        "center",
        "torchvision",
    )


def eval_transform(prep: Preprocessing) -> Any:
    """timm's evaluation transform: resize by the crop fraction, centre crop, normalise."""
    from timm.data import create_transform

    return create_transform(
        prep.input_size,
        is_training=False,
        interpolation=prep.interpolation,
        mean=prep.mean,
        std=prep.std,
        crop_pct=prep.crop_pct,
        crop_mode=prep.crop_mode,
    )


def train_transform(
    prep: Preprocessing, *, auto_augment: str | None = None, re_prob: float = 0.0, crop_min: float = 0.08
) -> Any:
    """timm's training transform: random-resized crop (area ``crop_min``-1 of the image), flip, colour
    jitter, optional RandAugment and erasing."""
    from timm.data import create_transform

    return create_transform(
        prep.input_size,
        is_training=True,
        scale=(crop_min, 1.0),
        auto_augment=auto_augment,
        re_prob=re_prob,
        interpolation=prep.interpolation,
        mean=prep.mean,
        std=prep.std,
    )
