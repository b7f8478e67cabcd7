"""Finding a model's convolutions and what they see in one probe forward.

Every ``nn.Conv2d`` (and every layer that is already dynamic) is found by walking
the module tree; a module reachable under several names (weight tying) is one
:class:`ConvSite` with all its names. One forward pass with hooks records each
conv's input and output shape, so selection can use facts such as "its input is
1x1" rather than guesses from names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dynconv import DynamicConv2d

from .errors import UserError
from .models import BASE_ATTR


class ProbeError(UserError, RuntimeError):
    """The probe forward failed, typically because the input size does not suit the model."""


def is_already_dynamic(module: nn.Module) -> bool:
    """dynconv's own layers and other libraries' dynamic convs (timm's ``CondConv2d``)."""
    return isinstance(module, DynamicConv2d) or (
        type(module).__name__ == "CondConv2d" and hasattr(module, "num_experts")
    )


@dataclass
class ConvSite:
    """One convolution module of a model and the facts the probe found about it."""

    names: list[str]
    module: nn.Module
    input_shape: tuple[int, ...] | None = None  # (C, H, W) of the first call
    output_shape: tuple[int, ...] | None = None
    calls: int = 0
    reads_image: bool = False

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def in_channels(self) -> int:
        return int(self.module.in_channels)

    @property
    def out_channels(self) -> int:
        return int(self.module.out_channels)

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.module.kernel_size)  # type: ignore[return-value]

    @property
    def stride(self) -> tuple[int, int]:
        return tuple(self.module.stride)  # type: ignore[return-value]

    @property
    def groups(self) -> int:
        return int(self.module.groups)

    @property
    def input_hw(self) -> tuple[int, int] | None:
        return None if self.input_shape is None else (self.input_shape[1], self.input_shape[2])

    @property
    def output_hw(self) -> tuple[int, int] | None:
        return None if self.output_shape is None else (self.output_shape[1], self.output_shape[2])

    @property
    def conv_type(self) -> str:
        """``depthwise`` (one input channel per group), ``pointwise`` (1x1) or ``spatial``."""
        if self.groups > 1 and self.groups == self.in_channels:
            return "depthwise"
        return "pointwise" if self.kernel == (1, 1) else "spatial"


def find_convs(model: nn.Module) -> list[ConvSite]:
    """Every ``nn.Conv2d`` or dynamic conv of ``model``, shared modules once, in module order."""
    sites: dict[int, ConvSite] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Conv2d) or is_already_dynamic(module):
            if id(module) in sites:
                sites[id(module)].names.append(name)
            else:
                sites[id(module)] = ConvSite([name], module)
    return list(sites.values())


def default_input_size(model: nn.Module) -> tuple[int, int, int]:
    """``(C, H, W)`` the model expects: timm's ``pretrained_cfg``, a torchvision ViT's
    ``image_size``, the crop size of a torchvision model's default weights, else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if size and len(size) == 3:
        return (int(size[0]), int(size[1]), int(size[2]))
    if isinstance(getattr(model, "image_size", None), int):
        return (3, model.image_size, model.image_size)
    base = getattr(model, BASE_ATTR, None)
    if getattr(base, "source", None) == "torchvision":
        import torchvision

        crop = getattr(torchvision.models.get_model_weights(base.name).DEFAULT.transforms(), "crop_size", None)
        if crop:
            return (3, int(crop[0]), int(crop[-1]))
    return (3, 224, 224)


def probe(model: nn.Module, sites: list[ConvSite], input_shape: tuple[int, int, int]) -> torch.Tensor:
    """Run one eval-mode forward at batch 1 and record each site's shapes; return the output."""
    by_module = {id(site.module): site for site in sites}

    def hook(module: nn.Module, args: tuple, output: object) -> None:
        site = by_module[id(module)]
        site.calls += 1
        if site.input_shape is None and args and isinstance(args[0], torch.Tensor):
            site.input_shape = tuple(args[0].shape[1:])
            site.reads_image = args[0].shape[1] == input_shape[0] and tuple(args[0].shape[2:]) == input_shape[1:]
            if isinstance(output, torch.Tensor):
                site.output_shape = tuple(output.shape[1:])

    handles = [site.module.register_forward_hook(hook) for site in sites]
    was_training = model.training
    param = next(model.parameters(), None)
    x = torch.randn(1, *input_shape, generator=torch.Generator().manual_seed(0))
    if param is not None:
        x = x.to(param.device, param.dtype if param.is_floating_point() else torch.float32)
    try:
        model.eval()
        with torch.no_grad():
            return model(x)
    except Exception as exc:  # any model error: report it as a probe failure with the size used
        raise ProbeError(
            f"the probe forward at input size {input_shape} failed ({type(exc).__name__}: {exc}); "
            "pass an input size the model accepts"
        ) from exc
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
